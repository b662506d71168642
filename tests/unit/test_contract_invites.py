"""Invites to a private swarm: made from addresses, pasted back, and every bad paste explained."""

import pytest

from contract.invites import PREFIX, InviteError, make_invite, parse_invite

LAN = "/ip4/192.168.1.20/tcp/31337/p2p/12D3KooWNxd3rVGKgYqxty8YaBywgYFny2cH2pdLbk3UQtKF4JGi"
LOOPBACK = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWNxd3rVGKgYqxty8YaBywgYFny2cH2pdLbk3UQtKF4JGi"
RELAYED = "/ip4/1.2.3.4/tcp/4001/p2p/QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5/p2p-circuit/p2p/12D3KooWNxd3rVGKgYqxty8YaBywgYFny2cH2pdLbk3UQtKF4JGi"  # noqa: E501


def test_round_trip_puts_addresses_others_can_dial_first():
    token = make_invite([LOOPBACK, RELAYED, LAN, LAN])
    assert token.startswith(PREFIX) and " " not in token and len(token) < 300
    assert parse_invite(token) == (LAN, RELAYED, LOOPBACK)
    assert parse_invite(f"  {token[:40]}\n{token[40:]}  ") == (LAN, RELAYED, LOOPBACK)  # wrapped when copied


@pytest.mark.parametrize(
    ("pasted", "says"),
    [
        ("", "paste the invite"),
        (LAN, "not a Pollinate invite"),
        ("pollinate-invite-9.abc", "another version"),
        (PREFIX + "!!!!", "damaged"),
        (PREFIX + "eJzLSM3JyQcABiwCFQ", "unusable address"),  # "hello" compressed: no multiaddress
        (PREFIX + "A" * 5000, "too long"),
    ],
)
def test_bad_pastes_get_a_reason(pasted, says):
    with pytest.raises(InviteError, match=says):
        parse_invite(pasted)


def test_a_damaged_tail_is_caught():
    token = make_invite([LAN])
    with pytest.raises(InviteError):
        parse_invite(token[:-6])


def test_nothing_to_invite_through_is_an_error():
    with pytest.raises(InviteError, match="no address"):
        make_invite([])
    with pytest.raises(InviteError, match="cannot invite"):
        make_invite(["/ip4/1.2.3.4/tcp/1"])
