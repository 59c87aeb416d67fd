"""The community's metrics: caption metrics equal pycocoevalcap's pipeline, VQA accuracy equals the official rule.

Java (PTB tokenizer, METEOR) is used where installed; the tests that need it are skipped without it. METEOR
runs in one Java process for the whole module: starting one loads its paraphrase table (~15 s here).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mmict_kernels.icl import evaluation, metrics

pycocoevalcap = pytest.importorskip("pycocoevalcap")
import pycocoevalcap.spice.spice as spice_module  # noqa: E402
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.meteor.meteor import Meteor  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="no java on PATH (the PTB tokenizer and METEOR are Java programs)")

# Small corpora: ragged references, punctuation, numbers, repeated words, a perfect 4-word caption, a degenerate
# repetition, an empty prediction, keys of several types.
CORPORA = [
    (
        {
            "img1": "A man riding a wave on top of a surfboard.",
            "img2": "Two dogs, one cat and a bird!",
            "img3": "a plate of food with broccoli",
        },
        {
            "img1": [
                "A man riding a wave on a surfboard.",
                "A surfer rides a big wave.",
                "Someone surfing in the ocean",
                "A person on a surfboard in the water.",
                "a man surfing",
            ],
            "img2": ["Two dogs and a cat playing.", "Animals: 2 dogs, 1 cat, 1 bird."],
            "img3": ["A plate of food with broccoli and rice."],
        },
    ),
    (
        {
            1: "There are 3,000 people at the 5th game.",
            2: "A clock reads 10:30; it's late.",
            3: "a $5 bill (new)",
            4: "the the the the the",
        },
        {
            1: ["About 3,000 people watch the 5th game", "A crowd of 3000 people at a game."],
            2: ["A clock that reads 10:30.", "It's 10:30 on the clock tower", "The clock shows half past ten."],
            3: ["A new $5 bill.", "a five dollar bill on a table"],
            4: ["The cat is on the mat.", "a cat sitting on a mat"],
        },
    ),
    (
        {"a": "a dog eating grass", "b": "dog dog dog dog dog dog", "c": "", ("d", 4): 'He\'s not wearing a "helmet"...'},
        {
            "a": ["a dog eating grass", "A brown dog grazing on grass."],
            "b": ["a dog on the grass"],
            "c": ["A red bus parked on the street."],
            ("d", 4): ["He isn't wearing a helmet.", "a man without a helmet"],
        },
    ),
    (
        {
            10: "A woman holding an umbrella in the rain",
            11: "A kid's bike leaning against the wall",
            12: "Giraffes eating leaves from a tall tree",
            13: "A man's hat is blue -- his shirt is red",
        },
        {
            10: ["A woman with an umbrella walking in the rain.", "A woman holds an umbrella."],
            11: ["A child's bicycle against a wall.", "A small bike leaning on a brick wall", "a kids bike"],
            12: ["Two giraffes eat leaves from a tree.", "Giraffes feeding on a tall tree."],
            13: ["A man wearing a blue hat and a red shirt."],
        },
    ),
]


@pytest.fixture(scope="module")
def meteor():
    """One pycocoevalcap METEOR process, shared by these tests and by metrics.caption_metrics."""
    if not HAS_JAVA:
        pytest.skip("no java on PATH")
    metrics.close_meteor()
    scorer = Meteor()
    metrics._meteor = scorer
    yield scorer
    metrics.close_meteor()


def _pycocoevalcap_scores(gts: dict, res: dict, meteor_scorer=None) -> dict:
    """pycocoevalcap's scorers called directly on tokenized captions, as COCOEvalCap.evaluate calls them."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n}": b for n, b in enumerate(bleu, start=1)}
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor_scorer is not None:
        out["METEOR"] = meteor_scorer.compute_score(gts, res)[0]
    return out


def _hide_java(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))
    monkeypatch.setenv("PATH", "")  # anything that still tried to start java would fail loudly


# ------------------------------------------------------------------ captions, with Java
@needs_java
def test_caption_metrics_equal_pycocoevalcap_scorers_on_ptb_tokens(meteor):
    # COCOEvalCap: tokenize the references, then the predictions, with PTBTokenizer; then each scorer.
    # All corpora go through the tokenizer in one call each (its lines are tokenized independently).
    gts_all = PTBTokenizer().tokenize(
        {(c, k): [{"caption": r} for r in refs[k]] for c, (_, refs) in enumerate(CORPORA) for k in refs}
    )
    res_all = PTBTokenizer().tokenize({(c, k): [{"caption": preds[k]}] for c, (preds, _) in enumerate(CORPORA) for k in preds})
    for c, (preds, refs) in enumerate(CORPORA):
        gts = {k: gts_all[(c, k)] for k in preds}
        res = {k: res_all[(c, k)] for k in preds}
        expected = _pycocoevalcap_scores(gts, res, meteor)
        got = metrics.caption_metrics(preds, refs)
        assert {name: got[name] for name in expected} == expected, c
        assert got["tokenizer"] == metrics.TOKENIZER_PTB and got["n"] == len(preds)
        assert set(got) >= set(metrics.CAPTION_METRICS) and "METEOR" not in got["unavailable"]
        assert all(isinstance(got[name], float) for name in expected)  # plain floats: JSON writes them
    degenerate = metrics.caption_metrics({"b": "dog dog dog dog dog dog"}, {"b": ["a dog on the grass"]})
    assert degenerate["BLEU-4"] < 1e-3 and degenerate["BLEU-1"] < 0.2  # clipped counts: one "dog" matches


@needs_java
def test_perfect_four_word_caption_scores_one(meteor):
    preds = {"a": "a dog eating grass", "b": "Two red buses parked."}
    got = metrics.caption_metrics(preds, {"a": ["a dog eating grass"], "b": ["two red buses parked"]})
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
        assert got[name] == pytest.approx(1.0), name
    assert got["CIDEr"] == pytest.approx(10.0)  # CIDEr's maximum for captions that share no n-gram across images


@needs_java
def test_java_line_breaks_do_not_shift_the_captions():
    # Java's lexer ends lines at \r, \v, \f, U+2028, U+2029 too: unguarded, every later caption moves up one image.
    got, tokenizer = metrics.tokenize_captions({0: ["a dog\ron grass"], 1: ["two\u2028cats"], 2: ["a bird"]})
    assert tokenizer == metrics.TOKENIZER_PTB
    assert got == {0: ["a dog on grass"], 1: ["two cats"], 2: ["a bird"]}


# A varied caption corpus on which the Python tokenizer must give the Java tokenizer's tokens.
# fmt: off
TOKENIZER_CORPUS = [
    "A man riding a wave on top of a surfboard.", "A group of people standing around a kitchen.",
    "Two giraffes standing next to each other in a field", "a cat sitting on a laptop keyboard",
    "A plate of food with broccoli, carrots and rice.", "The bathroom has a white toilet, sink, and mirror.",
    "An old-fashioned red fire hydrant on a sidewalk.", "A woman holding an umbrella in the rain!",
    "Is this a dog or a cat?", "there is a man that is playing tennis", "A baseball player swinging a bat at a ball .",
    "Several people on skis going down a snowy slope...", "A little girl's birthday cake with 5 candles.",
    "A kid's bike leaning against the wall.", "The dogs' toys are scattered on the floor.",
    "The man's hat is blue; his shirt is red.", 'A sign that says "STOP" at an intersection.',
    "A sign reading 'one way' on a pole.", "A bus (number 42) parked at the curb.",
    "Pizza with pepperoni [and cheese] on a table.", "A sandwich {with ham} on a plate", "A man in a suit and tie -- smiling.",
    "A black-and-white photo of a 10-year-old boy.",
    "It's a sunny day at the beach.", "He's not wearing a helmet, is he?", "They're sitting on a bench; it isn't raining.",
    "A dog that can't catch the frisbee.", "The man won't let go of the kite.", "I'm looking at a giraffe.",
    "We've got two pizzas and you'd like one.", "She'll be riding the horse, won't she?", "shouldn't've gone there",
    "A clock that reads 10:30 on a tower.", "The game starts at 3:45 pm.", "A crowd of 1,000 people at the stadium.",
    "The number 1,234,567 on a billboard.", "A $5 bill on a table next to a 2.5 inch ruler.", "A sale sign that says 50% off.",
    "A street sign for 5th Avenue and 3rd street.", "a photo taken in the 1990s", "Shoes from the '90s on a shelf.",
    "A man & a woman walking down the street.", "A dog/cat shaped pillow on the couch.",
    "Two people, one dog, and a cat: all asleep.",
    "wow!! look at that airplane", "Wait... what is that?!", "A close-up of a pizza", "A U.S. flag flying over the building.",
    "Mr. Smith standing next to his car.", "A woman at 5 p.m. waiting for a bus.", "A   man   with   extra   spaces",
    "\tA tab-separated\tcaption", "Cars, trucks, buses and bicycles on a busy road.", "Is it a horse? No, it's a zebra.",
    "A cup of coffee next to a donut -- yum!", 'He said, "that\'s my kite."', "A table (with chairs) set for dinner.",
    "someone's luggage on a conveyor belt", "The players' uniforms are green.", "A 3-D picture of a building.",
    "A car with the license plate ABC-123.", "There are 2 dogs, 3 cats, and 4 birds.", "A skier going down the hill at 40 mph.",
    "A ratio of 3:2 for the image.", "A 2x4 piece of wood.", "A 1.5x zoomed photo", "It\u2019s a woman\u2019s bicycle.",
    "A \u201cvintage\u201d car on display.", "A dog\u2014happy and wet\u2014after a swim.", "pages 10\u201312 of a book",
    "A list: apples, pears, plums.", "A caption with (nested [brackets]) inside.", "The boys' and girls' locker rooms.",
    'A plate that says "Happy Birthday!" on it.', "Okay... let's go.", "cannot believe it", "Gonna ride the wave.",
    "Look: a dog!", "a photo of the letter b.", "A. ", "rock 'n' roll on the radio", "'tis the season", "it's 5 o'clock.",
    "a,b and c", "ice-cream.", "a 100\u00b0 oven", "a+b=c on a board", "#1 fan", "*star* ~tilde", "", "   ", "...", "!!!",
]
# fmt: on


@needs_java
def test_python_tokenizer_equals_ptbtokenizer_on_captions():
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(TOKENIZER_CORPUS)})
    python, tokenizer = metrics.tokenize_captions({i: [c] for i, c in enumerate(TOKENIZER_CORPUS)}, use_java=False)
    assert tokenizer == metrics.TOKENIZER_PYTHON
    differ = [(c, java[i], python[i]) for i, c in enumerate(TOKENIZER_CORPUS) if java[i] != python[i]]
    assert not differ


# ------------------------------------------------------------------ captions, without Java
def test_without_java_meteor_and_spice_are_unavailable_and_the_rest_is_marked(monkeypatch):
    _hide_java(monkeypatch)
    preds, refs = CORPORA[0]
    got = metrics.caption_metrics(preds, refs)
    assert got["METEOR"] is None and got["SPICE"] is None
    assert "java" in got["unavailable"]["METEOR"] and "java" in got["unavailable"]["SPICE"]
    assert got["tokenizer"] == metrics.TOKENIZER_PYTHON
    gts = {k: [metrics.ptb_tokenize(r) for r in refs[k]] for k in preds}
    res = {k: [metrics.ptb_tokenize(preds[k])] for k in preds}
    assert {name: got[name] for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")} == _pycocoevalcap_scores(
        gts, res
    )
    perfect = metrics.caption_metrics({"a": "a dog eating grass"}, {"a": ["A dog eating grass."]})
    assert perfect["BLEU-4"] == pytest.approx(1.0) and perfect["ROUGE-L"] == pytest.approx(1.0)


def test_corpus_bleu_is_pycocoevalcaps_bleu_n(monkeypatch):
    _hide_java(monkeypatch)
    preds, refs = (
        ["red circle on dark grass", "blue square", "dog dog dog dog"],
        [["red circle on dark ground"], ["a blue square"], ["a dog"]],
    )
    gts = {i: [metrics.ptb_tokenize(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [metrics.ptb_tokenize(p)] for i, p in enumerate(preds)}
    for n in (1, 2, 4):
        assert metrics.corpus_bleu(preds, refs, max_n=n) == Bleu(n).compute_score(gts, res, verbose=0)[0][n - 1]
    assert metrics.corpus_bleu(["a red circle on dark"], [["a red circle on dark"]]) == pytest.approx(1.0)
    assert metrics.corpus_bleu(["blue"], [["red"]]) < 1e-6  # pycocoevalcap's tiny constants keep it just above 0
    with pytest.raises(ValueError, match="max_n"):
        metrics.corpus_bleu(preds, refs, max_n=5)
    with pytest.raises(ValueError, match="one reference list per prediction"):
        metrics.corpus_bleu(preds, refs[:2])


@needs_java
def test_spice_is_computed_where_its_models_are_present_and_listed_when_it_fails(meteor, monkeypatch):
    calls = []

    class FakeSpice:  # stands in for the Java program (its models are a download): checks what SPICE is given
        def compute_score(self, gts, res):
            calls.append((gts, res))
            return 0.25, []

    class FailingSpice:
        def compute_score(self, gts, res):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(metrics, "spice_missing", lambda: None)
    monkeypatch.setattr(spice_module, "Spice", FakeSpice)
    preds, refs = CORPORA[2]
    got = metrics.caption_metrics(preds, refs)
    assert got["SPICE"] == 0.25 and "SPICE" not in got["unavailable"]
    gts, res = calls[0]
    assert list(gts) == list(res) == list(range(len(preds)))  # integer keys: SPICE sorts them and writes them to JSON
    monkeypatch.setattr(spice_module, "Spice", FailingSpice)
    got = metrics.caption_metrics(preds, refs)
    assert got["SPICE"] is None and "SPICE failed" in got["unavailable"]["SPICE"] and got["METEOR"] is not None


def test_spice_without_its_models_names_them(monkeypatch, tmp_path):
    if not HAS_JAVA:
        pytest.skip("no java on PATH: the Java reason comes first")
    monkeypatch.setattr(spice_module, "__file__", str(tmp_path / "spice.py"))  # a folder without the models
    reason = metrics.spice_missing()
    assert "stanford-corenlp-3.6.0-models.jar" in reason and "get_stanford_models" in reason


def test_driver_scores_caption_tasks_with_caption_metrics(monkeypatch):
    _hide_java(monkeypatch)
    records = [
        {"query": 0, "task": "caption", "prediction": "a red circle on dark grass", "answers": ["a red circle on dark grass"]},
        {"query": 1, "task": "what_color", "prediction": "red", "answers": ["red"]},
        {"query": 2, "task": "caption", "prediction": "blue square", "answers": ["a blue square", "blue square on grass"]},
    ]
    scores = evaluation.score(records)
    captions = scores["caption"]["captions"]
    assert captions == metrics.caption_metrics(
        {0: records[0]["prediction"], 1: records[2]["prediction"]}, {0: records[0]["answers"], 1: records[2]["answers"]}
    )
    assert "captions" not in scores["what_color"] and "captions" not in scores["all"]
    assert scores["what_color"]["vqa_accuracy"] == 100.0 and scores["all"]["n"] == 3
    table = evaluation.format_table({"sampling": "random", "by_num_demos": {"2": {"scores": scores}}})
    assert "CIDEr" in table and f"{100 * captions['CIDEr']:7.1f}" in table and metrics.TOKENIZER_PYTHON in table


@pytest.mark.parametrize(
    "predictions, references, error, match",
    [
        ({"a": "x"}, {"b": ["x"]}, ValueError, r"predictions and references: expected the same keys.*\['a'\].*\['b'\]"),
        ({"a": "x"}, {"a": []}, ValueError, r"references\['a'\]: expected at least one reference"),
        ({"a": "x"}, {"a": ["ok", "  "]}, ValueError, r"references\['a'\]\[1\]"),
        ({"a": "x"}, {"a": "x"}, TypeError, r"references\['a'\]: expected a list of strings"),
        ({"a": 3}, {"a": ["x"]}, TypeError, r"predictions\['a'\]: expected a string"),
        ({}, {}, ValueError, "predictions: expected at least one caption"),
        (["x"], {0: ["x"]}, TypeError, "predictions: expected a dict"),
        ({"a": "x"}, [["x"]], TypeError, "references: expected a dict"),
    ],
)
def test_caption_metrics_refuses_bad_input_naming_the_argument(predictions, references, error, match):
    with pytest.raises(error, match=match):
        metrics.caption_metrics(predictions, references)


# ------------------------------------------------------------------ VQA accuracy
# Expected values: the official GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (commit a013f00)
# run on these cases as VQAv2 questions (answers with distinct answer_ids), unrounded accuracy per question.
OFFICIAL_VQA = [
    ("yes", ["yes"] * 10, 1.0),
    ("Yes", ["yes"] * 10, 0.0),  # unanimous humans: nothing is normalised, so case matters
    ("yes.", ["yes"] * 10, 0.0),
    ("  yes\n", ["yes"] * 10, 1.0),  # surrounding white space is always stripped
    ("Yes", ["yes"] * 9 + ["no"], 1.0),  # humans disagree: everything is normalised
    ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),  # leave-one-out: 2 matches score 0.6, not 2/3
    ("yes", ["yes"] + ["no"] * 9, 0.3),
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),
    ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),
    ("maybe", ["yes"] * 5 + ["no"] * 5, 0.0),
    ("two", ["2"] * 6 + ["two"] * 2 + ["3"] * 2, 1.0),  # number words to digits
    ("two", ["2"] * 10, 0.0),  # ... but not when the humans are unanimous
    ("none", ["0"] * 3 + ["none"] * 2 + ["1"] * 5, 1.0),
    ("ten", ["10"] * 4 + ["many"] * 6, 1.0),
    ("eleven", ["11"] * 4 + ["eleven"] * 2 + ["12"] * 4, 0.6),  # only zero..ten are mapped
    ("two dogs", ["2 dogs"] * 3 + ["2"] * 7, 0.9),
    ("dont", ["don't"] * 4 + ["no"] * 6, 1.0),  # contractions restored
    ("dont know", ["don't know"] * 3 + ["unknown"] * 7, 0.9),
    ("whats that", ["what's that"] * 2 + ["thing"] * 8, 0.6),
    ("Im", ["i'm"] * 5 + ["me"] * 5, 0.0),  # the table's capitalised keys never match
    ("oclock", ["o'clock"] * 5 + ["noon"] * 5, 1.0),
    ("1,000", ["1000"] * 5 + ["1,000"] * 2 + ["lot"] * 3, 1.0),  # comma between digits removed
    ("1,000 red/white", ["1000 redwhite"] * 3 + ["1000 red white"] * 7, 0.9),  # ... and then every mark is deleted
    ("red/white", ["red white"] * 6 + ["red"] * 4, 1.0),
    ("red / white", ["red white"] * 6 + ["red"] * 4, 1.0),
    ("a/b /c", ["ab c"] * 2 + ["a b c"] * 8, 0.6),  # one spaced "/" deletes every "/"
    ("red/white", ["red white"] * 2 + ["redwhite"] * 8, 0.6),  # an unspaced mark becomes a space
    ("red,white", ["red white"] * 2 + ["redwhite"] * 8, 0.6),
    ("red, white", ["red white"] * 2 + ["redwhite"] * 8, 0.6),
    ("3.5", ["3.5"] * 4 + ["35"] * 6, 1.0),  # a period before a digit stays
    ("3.", ["3"] * 4 + ["three"] * 4 + ["4"] * 2, 1.0),
    ("mr. smith", ["mr smith"] * 5 + ["smith"] * 5, 1.0),
    ("a dog", ["dog"] * 4 + ["the dog"] * 3 + ["cat"] * 3, 1.0),  # articles removed
    ("The Dog", ["dog"] * 2 + ["a dog"] * 2 + ["cat"] * 6, 1.0),
    ("an apple", ["apple"] * 2 + ["apples"] * 8, 0.6),
    ("t-shirt", ["t shirt"] * 3 + ["tshirt"] * 3 + ["shirt"] * 4, 0.9),
    ("t - shirt", ["t shirt"] * 3 + ["tshirt"] * 3 + ["shirt"] * 4, 0.9),
    ("man's", ["man's"] * 3 + ["mans"] * 7, 0.9),  # the apostrophe is not one of the marks
    ("yes!", ["yes"] * 6 + ["no"] * 4, 1.0),
    ("why?", ["why"] * 6 + ["no"] * 4, 1.0),
    ("(left)", ["left"] * 5 + ["right"] * 5, 1.0),
    ('"stop"', ["stop"] * 7 + ["go"] * 3, 1.0),
    ("bat & ball", ["bat & ball"] * 4 + ["bat and ball"] * 6, 1.0),
    ("10:30", ["10:30"] * 5 + ["1030"] * 5, 1.0),  # nor is the colon
    ("@home", ["home"] * 5 + ["@ home"] * 5, 1.0),
    ("black_and_white", ["black and white"] * 5 + ["bw"] * 5, 1.0),
    ("yes" + "." * 40, ["yes"] * 5 + ["no"] * 5, 0.0),  # the official code removes at most 32 periods
    ("yes" + "." * 40, ["yes........"] * 3 + ["no"] * 7, 0.0),
    ("red", ["red"] * 2 + ["blue"], 0.4444444444),  # 3 answers
    ("red", ["red"] * 4, 1.0),  # 4 answers
    ("Red", ["red", "Red", "blue", "red", "RED"], 1.0),  # 5 answers
    ("two", ["2", "two"], 0.3333333333),  # 2 answers
    ("yes", ["yes"] * 2 + ["no"] + ["yes"] * 3 + ["no"] + ["yes"], 1.0),  # 8 answers
    ("no", ["yes"] * 9 + ["no"], 0.3),
    ("", ["yes"] * 9 + [""], 0.3),
    ("the", ["a"] * 4 + ["the"] * 3 + ["yes"] * 3, 1.0),  # articles only: empty after normalisation
    ("Yes", ["yes"] * 9 + ["yes "], 0.0),  # unanimous once stripped: nothing normalised
    ("one way", ["1 way"] * 4 + ["one way"] * 2 + ["left"] * 4, 1.0),
    ("no\tparking", ["no parking"] * 4 + ["none"] * 6, 1.0),
    ("Zero", ["0"] * 2 + ["zero"] * 2 + ["none"] * 6, 1.0),
]


@pytest.mark.parametrize("prediction, answers, expected", OFFICIAL_VQA)
def test_vqa_accuracy_equals_the_official_evaluation(prediction, answers, expected):
    assert metrics.vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-9)


def test_vqa_accuracy_with_one_answer_is_the_normalised_match():
    # The official leave-one-out has nothing left with one answer (it would score 0): single-answer sets
    # (MSRVTT-QA, MSVD-QA, the toy data) score the normalised match.
    assert metrics.vqa_accuracy("Two", ["2"]) == 1.0
    assert metrics.vqa_accuracy("a dog.", ["dog"]) == 1.0
    assert metrics.vqa_accuracy("cat", ["dog"]) == 0.0


@pytest.mark.parametrize(
    "prediction, answers, error, match",
    [
        (3, ["x"], TypeError, "prediction: expected a string"),
        ("x", "x", TypeError, "answers: expected a list of strings"),
        ("x", [], ValueError, "answers: expected at least one"),
        ("x", ["x", None], TypeError, r"answers\[1\]: expected a string"),
    ],
)
def test_vqa_accuracy_refuses_bad_input_naming_the_argument(prediction, answers, error, match):
    with pytest.raises(error, match=match):
        metrics.vqa_accuracy(prediction, answers)


def test_exact_match_is_the_plain_normalised_match():
    assert metrics.exact_match("The Red.", ["red"]) == 1.0
    assert metrics.exact_match("red circle", ["blue circle", "red circle"]) == 1.0
    assert metrics.exact_match("red", ["blue"]) == 0.0
