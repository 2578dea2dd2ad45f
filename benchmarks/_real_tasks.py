"""Template-generated sentence classification tasks for benchmarks/real_adapters.py.

No downloaded data: every task draws sentences from small word lists and templates with
a seeded ``random.Random``; the label is a rule of the sentence (its sentiment words, its
topic, question vs statement, negation, the parity of a number word, ...). Each task is
learnable from ~100 short batches by a LoRA on a sentence encoder, and the tasks differ
from one another (different rules over partly overlapping vocabularies).

``make_tasks(n, seed)`` returns ``n`` distinct :class:`Task` objects (cycling through the
families below with different vocabularies/templates when ``n`` exceeds their number);
``task.sample(rng, k)`` returns ``k`` (text, label) pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

Pair = tuple[str, int]

POS = ["great", "wonderful", "excellent", "lovely", "fantastic", "delightful", "superb", "brilliant", "pleasant", "amazing"]
NEG = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "poor", "nasty", "miserable", "bad"]
TOPICS = {
    "sports": ["football", "tennis", "the match", "the goalkeeper", "the stadium", "the referee", "basketball", "the marathon", "the coach", "the league"],
    "food": ["the pasta", "the soup", "the bakery", "the chef", "dessert", "the pizza", "the salad", "breakfast", "the recipe", "the restaurant"],
    "tech": ["the laptop", "the software", "the new phone", "the server", "the app", "the keyboard", "the database", "the update", "the processor", "the network"],
    "music": ["the concert", "the guitar", "the album", "the singer", "the orchestra", "the drummer", "the melody", "the band", "the piano", "the song"],
    "animals": ["the dog", "the cat", "the horse", "the rabbit", "the parrot", "the elephant", "the tiger", "the cow", "the fox", "the whale"],
    "vehicles": ["the car", "the bus", "the train", "the truck", "the bicycle", "the plane", "the ship", "the tram", "the motorbike", "the taxi"],
    "weather": ["the rain", "the storm", "the sunshine", "the snow", "the wind", "the fog", "the forecast", "the heat", "the thunder", "the clouds"],
    "finance": ["the bank", "the stock", "the loan", "the budget", "the market", "the invoice", "the tax", "the salary", "the mortgage", "the shares"],
}
NUM_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
COLORS_WARM = ["red", "orange", "yellow", "pink", "golden"]
COLORS_COOL = ["blue", "green", "purple", "teal", "cyan"]
NOUNS = ["box", "chair", "door", "book", "wall", "house", "shirt", "cup", "lamp", "bag"]
NAMES = ["anna", "tom", "maria", "james", "lucy", "peter", "sara", "david", "emma", "john"]
VERBS_PRESENT = ["walks", "reads", "cooks", "plays", "writes", "sings", "works", "runs", "paints", "studies"]
VERBS_PAST = ["walked", "read yesterday", "cooked", "played", "wrote", "sang", "worked", "ran", "painted", "studied"]
PLACES_IN = ["in the kitchen", "in the office", "in the library", "in the museum", "in the bedroom", "in the cinema"]
PLACES_OUT = ["in the park", "on the beach", "in the forest", "on the mountain", "in the garden", "on the river"]
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]
WEEKEND = ["saturday", "sunday"]
MORNING = ["at dawn", "in the morning", "at breakfast time", "at seven am", "before noon"]
EVENING = ["at night", "in the evening", "at midnight", "after dinner", "at ten pm"]
SPANISH = ["el", "la", "casa", "perro", "gato", "comida", "muy", "bueno", "grande", "noche", "amigo", "playa"]
GERMAN = ["der", "die", "das", "haus", "hund", "katze", "essen", "sehr", "gut", "gross", "nacht", "freund"]
ENGLISH = ["the", "house", "dog", "cat", "food", "very", "good", "big", "night", "friend", "beach", "small"]
HAPPY = ["happy", "joyful", "cheerful", "glad", "thrilled"]
SAD = ["sad", "lonely", "gloomy", "heartbroken", "unhappy"]
ANGRY = ["angry", "furious", "annoyed", "outraged", "irritated"]
BIG_ANIMALS = ["elephant", "whale", "giraffe", "bear", "rhino", "hippo"]
SMALL_ANIMALS = ["mouse", "ant", "bee", "hamster", "sparrow", "frog"]
CHEAP = ["cheap", "affordable", "on sale", "a bargain", "inexpensive"]
EXPENSIVE = ["expensive", "pricey", "costly", "overpriced", "luxurious"]


@dataclass(frozen=True)
class Task:
    name: str
    num_labels: int
    gen: Callable[[random.Random], Pair]
    describe: str

    def sample(self, rng: random.Random, k: int) -> list[Pair]:
        return [self.gen(rng) for _ in range(k)]


def _c(rng: random.Random, xs):
    return xs[rng.randrange(len(xs))]


def _sentiment(subjects, templates):
    def gen(rng):
        y = rng.randrange(2)
        adj = _c(rng, POS if y else NEG)
        return _c(rng, templates).format(s=_c(rng, subjects), a=adj), y
    return gen


def _topic(names):
    def gen(rng):
        y = rng.randrange(len(names))
        subj = _c(rng, TOPICS[names[y]])
        tmpl = _c(rng, ["i heard about {s} today", "{s} was on the news", "we talked about {s} for hours",
                        "my friend mentioned {s}", "everyone is discussing {s}", "there is something new about {s}"])
        return tmpl.format(s=subj), y
    return gen


def _question():
    def gen(rng):
        y = rng.randrange(2)
        s, t = _c(rng, NAMES), _c(rng, TOPICS[_c(rng, list(TOPICS))])
        if y:
            return _c(rng, ["does {n} like {t}?", "where is {t}?", "why did {n} mention {t}?",
                            "can {n} see {t}?", "is {t} ready?"]).format(n=s, t=t), 1
        return _c(rng, ["{n} likes {t}.", "{t} is over there.", "{n} mentioned {t}.",
                        "{n} can see {t}.", "{t} is ready."]).format(n=s, t=t), 0
    return gen


def _negation():
    def gen(rng):
        y = rng.randrange(2)
        n, t = _c(rng, NAMES), _c(rng, TOPICS[_c(rng, list(TOPICS))])
        if y:
            return _c(rng, ["{n} does not like {t}", "{n} never talks about {t}", "{n} is not near {t}",
                            "{n} didn't see {t}"]).format(n=n, t=t), 1
        return _c(rng, ["{n} likes {t}", "{n} often talks about {t}", "{n} is near {t}",
                        "{n} saw {t}"]).format(n=n, t=t), 0
    return gen


def _number(rule):
    def gen(rng):
        i = rng.randrange(len(NUM_WORDS))
        y = rule(i + 1)
        return _c(rng, ["{n} has {k} {o}s", "i bought {k} {o}s", "there are {k} {o}s here",
                        "we counted {k} {o}s"]).format(n=_c(rng, NAMES), k=NUM_WORDS[i], o=_c(rng, NOUNS)), y
    return gen


def _contains(pos_words, neg_pool):
    def gen(rng):
        y = rng.randrange(2)
        w = _c(rng, pos_words if y else neg_pool)
        return _c(rng, ["{n} painted the {o} {w}", "the {w} {o} is new", "look at that {w} {o}",
                        "{n} wants a {w} {o}"]).format(n=_c(rng, NAMES), o=_c(rng, NOUNS), w=w), y
    return gen


def _pairs(words0, words1, templates):
    def gen(rng):
        y = rng.randrange(2)
        w = _c(rng, words1 if y else words0)
        return _c(rng, templates).format(n=_c(rng, NAMES), w=w, o=_c(rng, NOUNS)), y
    return gen


def _length():
    def gen(rng):
        y = rng.randrange(2)
        k = rng.randint(9, 14) if y else rng.randint(2, 5)
        words = [_c(rng, ENGLISH + NOUNS) for _ in range(k)]
        return " ".join(words), y
    return gen


def _language(langs):
    def gen(rng):
        y = rng.randrange(len(langs))
        return " ".join(_c(rng, langs[y]) for _ in range(rng.randint(3, 7))), y
    return gen


def _tense():
    def gen(rng):
        y = rng.randrange(2)
        i = rng.randrange(len(VERBS_PRESENT))
        v = VERBS_PAST[i] if y else VERBS_PRESENT[i]
        return f"{_c(rng, NAMES)} {v} {_c(rng, PLACES_IN + PLACES_OUT)}", y
    return gen


def _person():
    def gen(rng):
        y = rng.randrange(2)
        subj = _c(rng, ["i", "we"]) if y else _c(rng, NAMES + ["she", "he", "they"])
        return f"{subj} went to see {_c(rng, TOPICS['animals'])} {_c(rng, PLACES_OUT)}", y
    return gen


def _plural():
    def gen(rng):
        y = rng.randrange(2)
        o = _c(rng, NOUNS)
        return (f"the {o}s are {_c(rng, PLACES_IN)}" if y else f"the {o} is {_c(rng, PLACES_IN)}"), y
    return gen


def _emotion():
    lists = [HAPPY, SAD, ANGRY]
    def gen(rng):
        y = rng.randrange(3)
        return _c(rng, ["{n} felt {w} after the call", "today {n} is {w}", "{n} looked {w} at work",
                        "i am {w} about it"]).format(n=_c(rng, NAMES), w=_c(rng, lists[y])), y
    return gen


def _sentiment_negated():
    def gen(rng):
        pos = rng.randrange(2)
        neg = rng.randrange(2)
        adj = _c(rng, POS if pos else NEG)
        y = pos ^ neg
        s = _c(rng, TOPICS["food"] + TOPICS["tech"])
        return (f"{s} was not {adj}" if neg else f"{s} was {adj}"), y
    return gen


_TMPL_A = ["the movie was {a}", "{s} was {a}", "honestly {s} felt {a}", "what a {a} experience with {s}"]
_TMPL_B = ["i think {s} is {a}", "{s} turned out {a}", "the service at {s} was {a}", "our visit to {s} was {a}"]


def _families() -> list[tuple[str, int, Callable, str]]:
    T = TOPICS
    return [
        ("sentiment_movies", 2, _sentiment(["the film", "the plot", "the acting", "the ending"], _TMPL_A), "positive vs negative adjective"),
        ("topic_sports_food_tech", 3, _topic(["sports", "food", "tech"]), "topic, 3 classes"),
        ("question", 2, _question(), "question vs statement"),
        ("negation", 2, _negation(), "negated vs plain"),
        ("number_parity", 2, _number(lambda k: k % 2), "number word odd vs even"),
        ("contains_color", 2, _contains(COLORS_WARM + COLORS_COOL, ["old", "small", "heavy", "broken", "clean"]), "a colour word vs none"),
        ("topic_sports_music", 2, _topic(["sports", "music"]), "sports vs music"),
        ("length", 2, _length(), "long vs short word salad"),
        ("sentiment_food", 2, _sentiment(T["food"], _TMPL_B), "positive vs negative, food"),
        ("language_en_es_de", 3, _language([ENGLISH, SPANISH, GERMAN]), "english / spanish / german words"),
        ("tense", 2, _tense(), "past vs present"),
        ("number_large", 2, _number(lambda k: int(k > 6)), "number word > six"),
        ("color_warm_cool", 2, _contains(COLORS_WARM, COLORS_COOL), "warm vs cool colour"),
        ("topic_animals_vehicles", 2, _topic(["animals", "vehicles"]), "animals vs vehicles"),
        ("first_person", 2, _person(), "i/we vs third person"),
        ("plural", 2, _plural(), "plural vs singular subject"),
        ("emotion", 3, _emotion(), "happy / sad / angry"),
        ("indoor_outdoor", 2, _pairs(PLACES_IN, PLACES_OUT, ["{n} left the {o} {w}", "we found a {o} {w}", "{n} reads {w}"]), "outdoor vs indoor place"),
        ("weekend", 2, _pairs(WEEKDAYS, WEEKEND, ["{n} arrives on {w}", "the {o} is delivered on {w}", "see you {w}"]), "weekend vs weekday"),
        ("evening", 2, _pairs(MORNING, EVENING, ["{n} called {w}", "the {o} broke {w}", "we met {w}"]), "evening vs morning"),
        ("topic_weather_finance", 2, _topic(["weather", "finance"]), "weather vs finance"),
        ("animal_size", 2, _pairs(SMALL_ANIMALS, BIG_ANIMALS, ["{n} saw a {w}", "a {w} was near the {o}", "there is a {w} in the picture"]), "big vs small animal"),
        ("price", 2, _pairs(CHEAP, EXPENSIVE, ["the {o} was {w}", "{n} said the {o} is {w}", "that {o} looks {w}"]), "expensive vs cheap"),
        ("sentiment_negated", 2, _sentiment_negated(), "sentiment with negation flipping it"),
        ("language_en_es", 2, _language([ENGLISH, SPANISH]), "english vs spanish words"),
        ("topic_food_tech_music", 3, _topic(["food", "tech", "music"]), "topic, 3 classes"),
        ("sentiment_tech", 2, _sentiment(T["tech"], _TMPL_B), "positive vs negative, tech"),
        ("happy_vs_angry", 2, _pairs(HAPPY, ANGRY, ["{n} seems {w}", "the {o} made {n} {w}", "i feel {w}"]), "angry vs happy"),
        ("number_small", 2, _number(lambda k: int(k <= 3)), "number word ≤ three"),
        ("topic_animals_weather", 2, _topic(["animals", "weather"]), "animals vs weather"),
        ("language_es_de", 2, _language([SPANISH, GERMAN]), "german vs spanish words"),
        ("sad_vs_happy", 2, _pairs(HAPPY, SAD, ["{n} seems {w}", "the {o} made {n} {w}", "i feel {w}"]), "sad vs happy"),
        ("topic_vehicles_finance", 2, _topic(["vehicles", "finance"]), "vehicles vs finance"),
        ("sentiment_music", 2, _sentiment(T["music"], _TMPL_A), "positive vs negative, music"),
    ]


def make_tasks(n: int, seed: int = 0) -> list[Task]:
    """``n`` distinct tasks; beyond the family list, families repeat with a seeded label flip."""
    fams = _families()
    out: list[Task] = []
    for i in range(n):
        name, k, gen, desc = fams[i % len(fams)]
        rep = i // len(fams)
        if rep:
            perm = list(range(k))
            random.Random(seed * 1000 + i).shuffle(perm)
            if perm == list(range(k)):
                perm = perm[1:] + perm[:1]
            gen = (lambda g, p: (lambda rng: (lambda t: (t[0], p[t[1]]))(g(rng))))(gen, perm)
            name, desc = f"{name}_v{rep + 1}", f"{desc} (labels permuted {perm})"
        out.append(Task(f"t{i:02d}_{name}", k, gen, desc))
    return out
