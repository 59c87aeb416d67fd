"""Answer and caption metrics, computed the way the papers compute them.

- :func:`caption_metrics`: the COCO caption evaluation (pycocoevalcap): the Stanford PTB tokenizer, then
  BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when its models are installed), each by pycocoevalcap's own
  scorer, on its own scale (CIDEr 1.0 is printed as 100 in papers).
- :func:`vqa_accuracy`: the official VQAv2 accuracy (GT-Vision-Lab/VQA ``vqaEval.py``): its answer
  normalisation and ``min(#matching humans / 3, 1)`` averaged over the leave-one-out subsets of the answers.
- :func:`exact_match` / :func:`normalize`: a plain normalised match (the embedded toy data's accuracy).
- :func:`corpus_bleu`: pycocoevalcap's corpus BLEU-n alone (the comparison's caption column).

Java: the PTB tokenizer, METEOR and SPICE are Java programs shipped inside pycocoevalcap. Without ``java``
on PATH, METEOR and SPICE are reported unavailable (value ``None``, reason under ``"unavailable"``), and the
captions are tokenized by :func:`ptb_tokenize`, a Python approximation of the PTB tokenizer that gives the
same tokens on ordinary captions (tested against the Java tokenizer); such results say so in
``"tokenizer"``, since on unusual text (URLs, rare abbreviations, symbols) the tokens, and so the numbers,
may differ from the papers' pipeline.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence


def _coco(module: str):
    """A pycocoevalcap module, imported on first use: only the caption metrics need the package."""
    try:
        return importlib.import_module(f"pycocoevalcap.{module}")
    except ImportError as e:
        raise ImportError(f"the caption metrics need pycocoevalcap (pip install pycocoevalcap): {e}") from e


# ====================================================================== plain exact match (toy data)
_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, spaces collapsed (the toy data's answer form)."""
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers) -> float:
    """1.0 if the prediction equals any reference answer after :func:`normalize`, else 0.0."""
    p = normalize(prediction)
    return float(any(p == normalize(a) for a in answers))


# ====================================================================== VQAv2 accuracy
# The official evaluation's tables (data, reproduced as published). Its contraction keys with capitals
# ("Im", "Ive", ...) can never match, since words are lower-cased first; kept so the table is the official one.
# fmt: off
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                    "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# fmt: on
VQA_ARTICLES = ("a", "an", "the")
# The marks the official rule removes or turns into spaces (not ' : . and not $ % # & * etc.).
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE (32) where re.sub takes its count: only the first 32 periods go.
_OFFICIAL_PERIOD_LIMIT = 32


def vqa_punctuation(text: str) -> str:
    """The official punctuation step: each mark of :data:`VQA_PUNCTUATION` is deleted when the text has it next
    to a space, or when the text has a comma between digits anywhere ("1,000" -> "1000"), else it becomes a
    space ("red/white" -> "red white"); then periods not followed by a digit are deleted ("3.5" stays)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:  # the conditions look at the original text, as the official code does
        delete = delete_all or mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_LIMIT)


def vqa_digits_articles(text: str) -> str:
    """The official word step: lower case, number words to digits, articles dropped, contractions restored."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_normalize(answer: str) -> str:
    """An answer as the official evaluation compares it once the humans disagree: punctuation, then words."""
    return vqa_digits_articles(vqa_punctuation(answer))


def _vqa_strip(answer: str) -> str:
    # Applied to every answer and prediction by the official code, whatever the humans said.
    return answer.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQAv2 accuracy of one prediction, in [0, 1].

    For each human answer left out in turn, ``min(#other humans who gave the prediction / 3, 1)``; the
    mean over the leave-one-out subsets. As in the official code, the answers and the prediction are
    normalised (:func:`vqa_normalize`) only when the humans disagree: when every answer is the same
    string, the prediction must equal it exactly (after stripping surrounding white space).

    One answer (single-answer sets such as MSRVTT-QA): its leave-one-out subset is empty, so the official
    formula would score every prediction 0; here it is the match of the normalised prediction and answer.

    Args:
        prediction (str): the model's answer.
        answers (Sequence[str]): the human answers (VQAv2: 10), duplicates included.
    Returns:
        float: the accuracy (1.0, 0.9, 0.6, 0.3, 0.0, ... for 10 answers).
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction: expected a string, got {type(prediction).__name__}")
    answers = _string_list(answers, "answers")
    pred = _vqa_strip(prediction)
    humans = [_vqa_strip(a) for a in answers]
    if len(humans) == 1:
        return float(vqa_normalize(pred) == vqa_normalize(humans[0]))
    if len(set(humans)) > 1:
        pred, humans = vqa_normalize(pred), [vqa_normalize(a) for a in humans]
    matches = [a == pred for a in humans]
    total = sum(matches)
    # Leaving out answer i removes its match, if it was one, from the count.
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


# ====================================================================== caption tokenization
TOKENIZER_PTB = "PTBTokenizer"
TOKENIZER_PYTHON = "python (PTBTokenizer approximation: no java on PATH)"
# Characters Java's PTB lexer ends a line at. pycocoevalcap turns only "\n" into a space, so any other one
# would shift every later caption onto the wrong image; they are turned into spaces too.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (the PTB tokenizer, METEOR and SPICE need one)."""
    return shutil.which("java") is not None


def tokenize_captions(captions: Mapping, use_java: bool | None = None) -> tuple[dict, str]:
    """Captions tokenized the COCO evaluation's way, and the tokenizer used.

    Args:
        captions (Mapping[key, list[str]]): the captions of each key.
        use_java (bool | None): force the Java PTBTokenizer (True) or the Python one (False); default: Java
            when ``java`` is on PATH.
    Returns:
        tuple[dict[key, list[str]], str]: lower-case tokens joined by spaces, punctuation tokens removed, and
        :data:`TOKENIZER_PTB` or :data:`TOKENIZER_PYTHON`.
    """
    if use_java is None:
        use_java = java_available()
    if not use_java:
        return {k: [ptb_tokenize(c) for c in caps] for k, caps in captions.items()}, TOKENIZER_PYTHON
    lines = {k: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in caps] for k, caps in captions.items()}
    return _coco("tokenizer.ptbtokenizer").PTBTokenizer().tokenize(lines), TOKENIZER_PTB


# --- the Python approximation of Stanford's PTBTokenizer (-preserveLines -lowerCase), then pycocoevalcap's filter
_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": " -- ",
        "\u2014": " -- ",
        "\u2026": " ... ",
        "\u00a0": " ",
    }
)
_SPLIT_ANYWHERE = re.compile(r'(-{2,}|\.{3,}|"|``|[;\[\](){}])')  # always tokens of their own
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SYMBOLS = re.compile(r"([%$+=<>*~°]|#(?=\d))")  # split off as tokens ("50%" -> "50 %", "a+b" -> "a + b", "#1" -> "# 1")
_WORD_COMMA_WORD = re.compile(r"(?<=\D),|,(?=\D)")  # "a,b" splits; "1,000" stays
_WORD_COLON_WORD = re.compile(r"(?<=\D):|:(?=\D)")  # "a:b" splits; "10:30" stays
_DECIMAL_THEN_LETTERS = re.compile(r"^(\d+(?:[.,]\d+)+)([^\W\d_]+)$")  # "1.5x" -> "1.5 x"; "5th" stays
_SINGLE_QUOTE_WORDS = re.compile(r"^'(\d0s|em|n')$")  # "'90s", "'em", "'n'" keep their quote
_SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "lemme": "lem me",
    "gimme": "gim me",
    "'tis": "'t is",
    "'twas": "'t was",
}
_CLITIC = re.compile(r"^(.*[\w-])(n't|'s|'m|'d|'re|'ve|'ll)$")
_ABBREVIATIONS = set("mr mrs ms dr st vs jr sr prof etc inc co corp ltd jan feb aug sept oct nov dec tel".split())
_TRAILING_MARK = re.compile(r"([?!]+|[',:`.])$")  # "?!" stays one token; single marks are dropped later
_KEEPS_PERIOD = re.compile(r"^(?:[^\W\d_]|(?:[^\W\d_]+\.)+[^\W\d_]+)\.$")  # "a." "u.s." "p.m." "ph.d."


def ptb_tokenize(caption: str) -> str:
    """One caption tokenized like pycocoevalcap's PTBTokenizer, in Python (used when there is no Java).

    Covers what captions contain: lower case; punctuation, quotes and brackets split off (brackets as
    ``-lrb-`` etc., as the PTB lexer writes them); commas and colons between digits kept ("1,000", "10:30");
    clitics split ("don't" -> "do n't", "man's" -> "man 's"); a final period split off unless the word is an
    abbreviation ("u.s.", "mr.", single letters); then pycocoevalcap's punctuation tokens dropped.

    Args:
        caption (str): one caption.
    Returns:
        str: the tokens joined by single spaces.
    """
    text = _LINE_BREAKS.sub(" ", caption).translate(_TYPOGRAPHY).lower()
    tokens = []
    for piece in _SPLIT_ANYWHERE.split(text):
        if _SPLIT_ANYWHERE.fullmatch(piece):
            tokens.append(_BRACKETS.get(piece, piece))
            continue
        for chunk in _SYMBOLS.sub(r" \1 ", _WORD_COLON_WORD.sub(" ", _WORD_COMMA_WORD.sub(" ", piece))).split():
            tokens += _chunk_tokens(chunk)
    return " ".join(t for t in tokens if t not in _dropped_tokens())


@functools.cache
def _dropped_tokens() -> frozenset[str]:
    # pycocoevalcap's list, plus the plain double quote (the PTB lexer has already turned it into `` or '').
    return frozenset(_coco("tokenizer.ptbtokenizer").PUNCTUATIONS) | {'"'}


def _chunk_tokens(chunk: str) -> list[str]:
    """The tokens of one space-free chunk: leading quotes, the word, trailing quotes and marks."""
    lead, tail = [], []
    while chunk.startswith(("'", "`")) and not _SINGLE_QUOTE_WORDS.match(chunk) and chunk not in _SPLIT_WORDS:
        lead.append(chunk[0])
        chunk = chunk[1:]
    while chunk:
        end = _TRAILING_MARK.search(chunk)
        if (
            end is None
            or (end.group() == "'" and _SINGLE_QUOTE_WORDS.match(chunk))
            or (end.group() == "." and _keeps_period(chunk))
        ):
            break
        tail.insert(0, end.group())
        chunk = chunk[: end.start()]
    return lead + _word_tokens(chunk) + tail


def _keeps_period(word: str) -> bool:
    """An abbreviation keeps its period ("u.s.", "mr.", "a."); other words ("dog.", "42.") lose it."""
    return bool(_KEEPS_PERIOD.match(word)) or word[:-1] in _ABBREVIATIONS


def _word_tokens(word: str) -> list[str]:
    """A word with its clitics and fixed splits separated ("shouldn't've" -> should n't 've)."""
    if not word:
        return []
    if word in _SPLIT_WORDS:
        return _SPLIT_WORDS[word].split()
    number = _DECIMAL_THEN_LETTERS.match(word)
    if number:
        return [number.group(1), number.group(2)]
    clitics = []
    while (m := _CLITIC.match(word)) is not None:
        word, clitic = m.group(1), m.group(2)
        clitics.insert(0, clitic)
    return [word] + clitics


# ====================================================================== caption metrics
CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
_NO_JAVA = "needs Java: no `java` on PATH (install a JRE, e.g. apt-get install default-jre-headless)"


def caption_metrics(predictions: Mapping, references: Mapping) -> dict:
    """The COCO caption metrics of a corpus, computed by pycocoevalcap as its COCOEvalCap does.

    Predictions and references are tokenized by pycocoevalcap's PTBTokenizer (see :func:`tokenize_captions`),
    then scored by its ``Bleu(4)``, ``Meteor()``, ``Rouge()``, ``Cider()`` and, when the Stanford models are
    installed, ``Spice()``. Values are on pycocoevalcap's scale (papers print 100x: CIDEr 1.0 is "100").
    CIDEr weighs n-grams by their document frequency over this corpus's references, as COCO does, so it
    needs a corpus: a single caption always scores 0.

    Args:
        predictions (Mapping[key, str]): one generated caption per image/video key.
        references (Mapping[key, Sequence[str]]): the human captions of each key (at least one), same keys.
    Returns:
        dict: ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"}`` -> float, or
        ``None`` for a metric that could not be computed, with its reason in ``"unavailable"`` (name -> reason);
        ``"tokenizer"``: :data:`TOKENIZER_PTB`, or :data:`TOKENIZER_PYTHON` when Java is missing (numbers then
        approximate the papers' pipeline); ``"n"``: the number of captions scored.

    METEOR runs in one Java process, started by the first call (it loads a paraphrase table: ~15 s) and kept
    for the next ones; :func:`close_meteor` stops it. A failing PTB tokenizer (a broken Java) raises.
    """
    keys = _check_caption_inputs(predictions, references)
    use_java = java_available()
    # Integer keys in the predictions' order: every scorer sees the same order, and SPICE (which sorts the
    # keys and writes them to JSON) accepts them whatever the caller's keys are.
    gts, tokenizer = tokenize_captions({i: list(references[k]) for i, k in enumerate(keys)}, use_java)
    res, _ = tokenize_captions({i: [predictions[k]] for i, k in enumerate(keys)}, use_java)
    out: dict = dict.fromkeys(CAPTION_METRICS)
    unavailable: dict[str, str] = {}
    bleu, _ = _coco("bleu.bleu").Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"BLEU-{n}"] = float(value)
    out["ROUGE-L"] = float(_coco("rouge.rouge").Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(_coco("cider.cider").Cider().compute_score(gts, res)[0])
    for name, scorer in (("METEOR", _meteor_score), ("SPICE", _spice_score)):
        value, reason = scorer(gts, res) if use_java else (None, _NO_JAVA)
        out[name] = value
        if reason is not None:
            unavailable[name] = reason
    out.update(unavailable=unavailable, tokenizer=tokenizer, n=len(keys))
    return out


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """pycocoevalcap's corpus BLEU-``max_n`` (closest reference length, no smoothing beyond its own), in [0, 1].

    Tokenized as :func:`caption_metrics` tokenizes. Args: ``predictions`` one caption per item;
    ``references`` the reference captions of each item (at least one); ``max_n`` 1 to 4.
    """
    if not isinstance(max_n, int) or not 1 <= max_n <= 4:
        raise ValueError(f"max_n: expected an integer from 1 to 4, got {max_n!r}")
    if isinstance(predictions, (str, bytes)) or not isinstance(predictions, Sequence):
        raise TypeError(f"predictions: expected a list of strings, got {type(predictions).__name__}")
    if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
        raise TypeError(f"references: expected a list of reference lists, got {type(references).__name__}")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references: expected one reference list per prediction, got {len(predictions)} "
            f"predictions and {len(references)} reference lists"
        )
    preds, refs = dict(enumerate(predictions)), dict(enumerate(references))
    _check_caption_inputs(preds, refs)
    use_java = java_available()
    gts, _ = tokenize_captions({k: list(v) for k, v in refs.items()}, use_java)
    res, _ = tokenize_captions({k: [v] for k, v in preds.items()}, use_java)
    return float(_coco("bleu.bleu").Bleu(max_n).compute_score(gts, res, verbose=0)[0][max_n - 1])


def _check_caption_inputs(predictions, references) -> list:
    """The keys in the predictions' order, after checking both mappings (errors name the argument)."""
    for name, value in (("predictions", predictions), ("references", references)):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name}: expected a dict keyed by image/video id, got {type(value).__name__}")
    if not predictions:
        raise ValueError("predictions: expected at least one caption, got none")
    extra, missing = [k for k in predictions if k not in references], [k for k in references if k not in predictions]
    if extra or missing:
        raise ValueError(
            f"predictions and references: expected the same keys; only in predictions: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}, only in references: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    for k, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"predictions[{k!r}]: expected a string, got {type(caption).__name__}")
    for k, refs in references.items():
        refs = _string_list(refs, f"references[{k!r}]")
        blank = [i for i, r in enumerate(refs) if not r.strip()]
        if blank:
            raise ValueError(f"references[{k!r}][{blank[0]}]: expected a reference caption, got an empty string")
    return list(predictions)


def _string_list(value, name: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a list of strings, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name}: expected at least one reference, got an empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}]: expected a string, got {type(item).__name__}")
    return list(value)


# --- METEOR: one Java process, started on first use (loading its paraphrase table takes ~15 s) and kept
_meteor_lock = threading.Lock()
_meteor = None  # pycocoevalcap's Meteor


def _meteor_score(gts: dict, res: dict) -> tuple[float | None, str | None]:
    """pycocoevalcap's corpus METEOR, or None and why it failed (the process is then discarded)."""
    global _meteor
    with _meteor_lock:
        try:
            if _meteor is None or _meteor.meteor_p.poll() is not None:
                _meteor = _coco("meteor.meteor").Meteor()
            return float(_meteor.compute_score(gts, res)[0]), None
        except (OSError, ValueError) as e:  # the JVM did not start, died, or answered nothing (empty line)
            reason = f"METEOR failed: {type(e).__name__}: {e}{_java_error(_meteor)}"
            _discard_meteor()
            return None, reason


def _java_error(scorer) -> str:
    process = getattr(scorer, "meteor_p", None)
    if process is None or process.poll() is None:
        return ""
    return "; java said: " + process.stderr.read().decode(errors="replace").strip()[-500:]


def close_meteor() -> None:
    """Stops the METEOR Java process, if one was started (the next METEOR score starts a new one)."""
    with _meteor_lock:
        _discard_meteor()


def _discard_meteor() -> None:
    global _meteor
    scorer, _meteor = _meteor, None
    if scorer is None:
        return
    if scorer.lock.locked():  # a failed compute_score returns without releasing it, and its __del__ would wait forever
        scorer.lock.release()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
    for pipe in (scorer.meteor_p.stdin, scorer.meteor_p.stdout, scorer.meteor_p.stderr):
        pipe.close()


atexit.register(close_meteor)


# --- SPICE: only where pycocoevalcap's Stanford CoreNLP models are installed (it would download them)
_SPICE_MODELS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_missing() -> str | None:
    """Why SPICE cannot run here, or None when Java and the Stanford CoreNLP models are present."""
    if not java_available():
        return _NO_JAVA
    lib = os.path.join(os.path.dirname(os.path.abspath(_coco("spice.spice").__file__)), "lib")
    missing = [m for m in _SPICE_MODELS if not os.path.exists(os.path.join(lib, m))]
    if missing:
        return (
            f"needs the Stanford CoreNLP models ({', '.join(missing)}) in {lib}; fetch them with "
            "`python -m pycocoevalcap.spice.get_stanford_models`"
        )
    return None


def _spice_score(gts: dict, res: dict) -> tuple[float | None, str | None]:
    reason = spice_missing()
    if reason is not None:
        return None, reason
    try:
        return float(_coco("spice.spice").Spice().compute_score(gts, res)[0]), None
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        return None, f"SPICE failed: {type(e).__name__}: {e}"
