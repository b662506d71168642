"""Entry point of the desktop app (`pollinate`, `python -m app`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pollinate", description="Pollinate desktop app")
    parser.add_argument("--data-dir", help="data folder (chat history, engine state); default: platformdirs")
    parser.add_argument("--config-dir", help="settings folder; default: platformdirs")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `engine.cli run` (repeatable), e.g. --engine-arg=--log-level=debug",
    )
    parser.add_argument(
        "--no-engine",
        action="store_true",
        help="do not start an engine: connect to the one named by engine-state.json",
    )
    parser.add_argument("--minimized", action="store_true", help="start in the tray without showing a window")
    parser.add_argument("--skip-onboarding", action="store_true", help=argparse.SUPPRESS)
    # For bench/app_startup.py: print timing and memory once the window is shown, then quit.
    parser.add_argument("--report-startup", action="store_true", help=argparse.SUPPRESS)
    # For the bundle smoke test (installers/): wait up to N s for the engine to run or fail, report, quit.
    parser.add_argument("--report-engine", type=float, default=0.0, metavar="N", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the app; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.data_dir:
        os.environ["POLLINATE_DATA_DIR"] = os.path.abspath(args.data_dir)
    if args.config_dir:
        os.environ["POLLINATE_CONFIG_DIR"] = os.path.abspath(args.config_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from app import paths
    from app.qt import QApplication, QTimer
    from app.settings import load_settings, save_settings
    from app.single_instance import SingleInstance

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Pollinate")
    app.setQuitOnLastWindowClosed(False)
    instance = SingleInstance(paths.data_dir())
    if not instance.claim():
        print("Pollinate is already running: showing its window.", file=sys.stderr)
        return 0

    from app.controller import AppController

    settings = load_settings()
    controller = AppController(settings, manage_engine=not args.no_engine, engine_args=tuple(args.engine_arg))
    instance.activated.connect(controller.show_dashboard)

    def begin(settings_now) -> None:
        controller.settings = settings_now
        controller.start(show_window=not args.minimized)

    if settings.onboarded or args.skip_onboarding or args.report_startup or args.report_engine:
        begin(settings)
    else:
        from app.windows.onboarding import OnboardingDialog

        dialog = OnboardingDialog.for_this_computer(settings)
        dialog.setWindowIcon(controller.dashboard.windowIcon())

        def onboarded() -> None:
            chosen = dialog.result_settings()
            save_settings(chosen)
            controller.apply_settings(chosen)
            begin(chosen)

        dialog.accepted.connect(onboarded)
        dialog.rejected.connect(lambda: begin(settings))
        dialog.show()

    if args.report_startup or args.report_engine:
        shown_at, reported = [], []

        def report() -> None:
            import psutil

            if reported:
                return
            reported.append(True)
            report = {
                "shown": controller.dashboard.isVisible(),
                "shown_at": shown_at[0] if shown_at else time.time(),
                "rss_bytes": psutil.Process().memory_info().rss,
            }
            if args.report_engine:
                report.update(engine_state=controller.engine.state, engine_message=controller.engine.message)
                report.update(engine_at=time.time(), headline=controller.dashboard.headline.text())
            print(json.dumps(report), flush=True)
            controller.confirm_quit = False
            controller.shutdown()
            app.quit()

        def shown() -> None:
            shown_at.append(time.time())
            if not args.report_engine or controller.engine.state in ("running", "failed"):
                report()
            else:
                done = lambda state, _message: state in ("running", "failed") and report()  # noqa: E731
                controller.engine.state_changed.connect(done)
                QTimer.singleShot(int(args.report_engine * 1000), report)

        QTimer.singleShot(0, shown)

    code = app.exec()
    instance.release()
    return code


if __name__ == "__main__":
    sys.exit(main())
