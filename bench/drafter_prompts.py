"""Chat prompts for training a feature drafter (bench/train_drafter.py) and for measuring it (held out).

Ordinary chat: explanations, advice, short writing tasks. Kept apart from the WAN bench's two prompts
(a hash table question and a paragraph rewrite): no data structures, lookups or rewriting in either set.
The held-out prompts share no topic with the training prompts.
"""

from __future__ import annotations

import random

TOPICS = (
    "photosynthesis",
    "inflation",
    "a volcano",
    "the stock market",
    "gravity",
    "a vaccine",
    "the water cycle",
    "democracy",
    "a black hole",
    "compound interest",
    "climate change",
    "the immune system",
    "a rainbow",
    "electricity",
    "an earthquake",
    "the phases of the moon",
    "recycling",
    "a credit score",
    "jazz music",
    "the Renaissance",
    "a solar panel",
    "evolution",
    "a mortgage",
    "meditation",
    "the Olympic Games",
    "a hurricane",
    "coffee",
    "sleep",
    "the Roman Empire",
    "a telescope",
    "encryption",
    "a web browser",
    "cloud computing",
    "a compiler",
    "machine learning",
    "a password manager",
    "the French Revolution",
    "DNA",
    "a bicycle gear",
    "the ocean tides",
    "honey bees",
    "a thunderstorm",
    "the printing press",
    "nuclear energy",
    "a savings account",
    "the human heart",
    "yoga",
    "chess",
    "a rain forest",
    "the metric system",
    "vitamins",
    "a refrigerator",
    "wind turbines",
    "the Great Wall",
)

TOPIC_FORMS = (
    "What is {}?",
    "Tell me about {}.",
    "Describe {} to a ten-year-old.",
    "What are the main benefits of {}?",
    "Give me three interesting facts about {}.",
    "How does {} work?",
    "Write a short paragraph about {}.",
    "What are common misconceptions about {}?",
)

ACTIVITIES = (
    "learning a new language",
    "saving money",
    "sleeping better",
    "running a first marathon",
    "cooking for a family on a budget",
    "keeping houseplants alive",
    "preparing for a job interview",
    "studying for an exam",
    "making new friends in a new city",
    "starting a vegetable garden",
    "reducing stress",
    "writing a cover letter",
    "taking better photos with a phone",
    "planning a road trip",
    "learning to play the guitar",
    "eating more vegetables",
    "keeping a daily journal",
    "training a puppy",
    "speaking in public",
    "organizing a small kitchen",
)

ACTIVITY_FORMS = (
    "Give me three tips for {}.",
    "What should a beginner know about {}?",
    "What are the most common mistakes people make when {}?",
    "How can I get better at {}?",
)

WRITING = (
    "Write a short email to a neighbor inviting them to a barbecue on Saturday.",
    "Write a thank-you note to a teacher.",
    "Write a haiku about autumn leaves.",
    "Write a short poem about the sea.",
    "Write a two-sentence horror story.",
    "Suggest five names for a bakery.",
    "Write a birthday message for my grandmother.",
    "Write a short product description for a reusable water bottle.",
    "Write a polite reply declining a party invitation.",
    "Write a motivational message for a friend running a race tomorrow.",
    "Write a short story about a robot who learns to paint.",
    "Write a limerick about a cat.",
    "Suggest a weekly workout plan for a busy person.",
    "Write a short speech for a friend's wedding.",
    "Write a job posting for a part-time barista.",
    "Plan a three-day trip to Rome.",
    "Suggest three board games for a family evening.",
    "Write a short apology message for missing a call.",
    "Write a recipe for a simple tomato soup.",
    "Write a short review of an imaginary restaurant.",
)

# Measurement only: topics and tasks that appear nowhere above.
HELD_OUT = (
    "What is the difference between weather and climate?",
    "Why do leaves change color in the fall?",
    "How do airplanes stay in the air?",
    "Give me three tips for keeping a tidy desk.",
    "What should I pack for a weekend camping trip?",
    "Write a short email to my landlord about a leaking tap.",
    "Tell me about the history of the bicycle.",
    "What are the health benefits of walking every day?",
    "How do vaccines differ from antibiotics?",
    "Write a short poem about a snowy morning.",
    "What causes the northern lights?",
    "How do I make a good first impression at a new job?",
    "Explain how a rocket reaches orbit.",
    "Why do we dream?",
    "Suggest three hobbies for someone who likes being outdoors.",
    "What is the role of the kidneys in the body?",
)


def training_prompts(count: int = 300, seed: int = 0) -> list[str]:
    """`count` distinct training prompts, the same ones for the same seed."""
    every = [form.format(t) for t in TOPICS for form in TOPIC_FORMS]
    every += [form.format(a) for a in ACTIVITIES for form in ACTIVITY_FORMS]
    rng = random.Random(seed)
    rng.shuffle(every)
    chosen = list(WRITING) + every
    return chosen[:count]
