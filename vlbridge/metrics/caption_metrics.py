"""
Captioning and VQA metrics as in the COCO caption and VQAv2 evaluation servers (pure Python + NumPy; the `evaluate`
modules in `cider/`, `bleu4/` and `vqa_accuracy/` wrap them).

- `cider_d` and `bleu` give the numbers of pycocoevalcap's `Cider()` / `Bleu(4)` on the same token strings.
- `tokenize_caption` is a light stand-in for the Stanford PTB tokenizer + punctuation filter that the COCO pipeline
  runs before scoring (no Java needed).
- `vqa_accuracy` / `normalize_vqa_answer` follow the answer processing and the 10-annotator consensus of `vqaEval.py`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np


# PTB splits these clitics off the word before them ("don't" -> "do n't", "dog's" -> "dog 's").
_CLITIC = re.compile(r"(?<=\w)(n't|'(?:s|re|ve|ll|d|m))\b")
# A token: a split-off clitic; a word (word characters joined by - ' & / . or by , : between digits, so that
# "black-and-white", "o'clock", "3.5", "1,000" and "10:30" stay whole as in PTB); or any other single symbol that
# PTB keeps ($ % # & @ + = * / ...). What COCO filters out after PTB (. , ? ! : ; - quotes backticks) is dropped,
# and so are brackets.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:(?:[-'&/.]|(?<=\d)[,:](?=\d))\w+)*|[^\w\s.,?!:;'\"`()\[\]{}-]")


def tokenize_caption(text: str) -> str:
    """
    Tokenise a caption roughly as the COCO caption pipeline does (Stanford PTB tokenizer with `-lowerCase`, then
    dropping punctuation tokens), and return the tokens joined by single spaces.

    The rules: lowercase; curly apostrophes become `'`; the clitics `n't 's 're 've 'll 'd 'm` are split off as
    separate tokens and `cannot` becomes `can not` (as PTB does); words keep inner hyphens, apostrophes, `&`, `/` and
    periods, and numbers keep a comma or colon between digits (`black-and-white`, `o'clock`, `3.5`, `1,000`,
    `10:30`); the punctuation that the COCO pipeline filters out (`. , ? ! : ; - -- ... ' " `` ''`) and brackets are
    dropped; any other symbol (`$ % # & @ + = * /` ...) becomes a token of its own. On ordinary captions this gives
    exactly the strings the COCO scorers see. Known differences, all rare in captions: PTB keeps the final period of
    abbreviations (`u.s.`; here `u.s`) and the sign of `-5`, splits `gonna` / `wanna` into two tokens, and turns
    brackets into `-lrb-` / `-rrb-` tokens, which the COCO filter misses because it lists them in upper case.

    Args:
        text (`str`):
            A raw caption.

    Returns:
        `str`: The lower-cased tokens separated by single spaces (empty if the caption had no word).

    Example:

    ```python
    >>> from vlbridge.metrics.caption_metrics import tokenize_caption
    >>> tokenize_caption('A man\\'s black-and-white dog, running (fast) on 3.5 "km" of grass... it isn\\'t tired!')
    "a man 's black-and-white dog running fast on 3.5 km of grass it is n't tired"
    ```
    """
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"\bcannot\b", "can not", text)
    text = _CLITIC.sub(r" \1", text)
    return " ".join(_TOKEN.findall(text))


def _check_caption_inputs(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: bool
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Validate the inputs and split every caption into tokens (after `tokenize_caption` when asked)."""
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} lists of references.")
    if len(predictions) == 0:
        raise ValueError("Caption metrics need at least one image.")

    def split(caption: str) -> list[str]:
        if not isinstance(caption, str):
            raise TypeError(f"Captions must be strings, got {type(caption).__name__}: {caption!r}.")
        return (tokenize_caption(caption) if tokenize else caption).split()

    candidates, reference_tokens = [], []
    for index, (prediction, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str):
            # Iterating a bare string would silently score against its characters.
            raise TypeError(f"References of image {index} must be a list of strings, e.g. [{refs!r}].")
        if len(refs) == 0:
            raise ValueError(f"Image {index} has no reference caption.")
        candidates.append(split(prediction))
        reference_tokens.append([split(ref) for ref in refs])
    return candidates, reference_tokens


def _ngram_counts(tokens: list[str], max_order: int) -> Counter:
    """Counts of every n-gram (as a tuple) of order 1..max_order."""
    return Counter(
        tuple(tokens[start : start + order])
        for order in range(1, max_order + 1)
        for start in range(len(tokens) - order + 1)
    )


def _tfidf_vector(
    counts: Counter, idf: dict[tuple[str, ...], float], default_idf: float, max_order: int
) -> tuple[list[dict[tuple[str, ...], float]], np.ndarray, int]:
    """Per-order tf-idf weights (raw term count times idf), their L2 norms, and the length the penalty compares."""
    weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_order)]
    for ngram, term_count in counts.items():
        weights[len(ngram) - 1][ngram] = term_count * idf.get(ngram, default_idf)
    norms = np.array([math.sqrt(sum(value * value for value in order.values())) for order in weights])
    # The COCO scorer measures a caption's length by its number of bigrams (words - 1, or 0 for an empty caption).
    # Only length differences enter the penalty, so this equals the word-count difference except for empty captions
    # (and with max_order=1 there are no bigrams, hence no penalty, in the COCO scorer as here).
    length = sum(count for ngram, count in counts.items() if len(ngram) == 2)
    return weights, norms, length


def _cider_d_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    max_order: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> np.ndarray:
    """The CIDEr-D score of every image, shape `(num_images,)`; `cider_d` is their mean."""
    candidates, reference_tokens = _check_caption_inputs(predictions, references, tokenize)
    candidate_counts = [_ngram_counts(tokens, max_order) for tokens in candidates]
    reference_counts = [[_ngram_counts(tokens, max_order) for tokens in refs] for refs in reference_tokens]

    # Document frequency: in how many images' reference sets an n-gram occurs (the references of this corpus only).
    document_frequency: Counter = Counter()
    for refs in reference_counts:
        document_frequency.update({ngram for counts in refs for ngram in counts})
    log_num_images = math.log(len(reference_counts))
    idf = {ngram: log_num_images - math.log(max(1.0, df)) for ngram, df in document_frequency.items()}

    scores = np.zeros(len(candidates))
    for image, (counts, refs) in enumerate(zip(candidate_counts, reference_counts)):
        # An n-gram absent from every reference has df 0, floored to 1, hence idf log(N).
        vector, norm, length = _tfidf_vector(counts, idf, log_num_images, max_order)
        per_order = np.zeros(max_order)
        for ref in refs:
            ref_vector, ref_norm, ref_length = _tfidf_vector(ref, idf, log_num_images, max_order)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for order in range(max_order):
                if norm[order] == 0 or ref_norm[order] == 0:
                    continue
                # "-D": the candidate's weight is clipped at the reference's, so repeating an n-gram cannot pay.
                dot = sum(
                    min(value, ref_vector[order].get(ngram, 0.0)) * ref_vector[order].get(ngram, 0.0)
                    for ngram, value in vector[order].items()
                )
                per_order[order] += penalty * dot / (norm[order] * ref_norm[order])
        scores[image] = 10.0 * per_order.mean() / len(refs)
    return scores


def cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    max_order: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> float:
    """
    CIDEr-D (Vedantam et al., 2015) of a captioning corpus, as computed by the COCO caption evaluation
    (pycocoevalcap's `Cider()`, which despite its name is CIDEr-D).

    For n = 1..`max_order`, every caption becomes a vector of n-gram counts weighted by
    `idf = log(num_images) - log(max(1, df))`, where `df` counts the images whose *references* contain the n-gram (so
    the idf comes from the evaluated corpus itself). Each reference contributes the cosine similarity of candidate and
    reference vectors, with the candidate's weights clipped at the reference's, times the Gaussian length penalty
    `exp(-(len_c - len_r)**2 / (2 * sigma**2))`. Similarities are averaged over n and over the references, multiplied
    by 10, and averaged over images. Papers report this value times 100 (e.g. 1.174 -> "CIDEr 117.4").

    Because the idf is taken from the corpus, the score of an image depends on the other images: score the whole
    evaluation set at once (a single image always scores 0, every n-gram having idf 0).

    Args:
        predictions (`list[str]`):
            One generated caption per image.
        references (`list[list[str]]`):
            The ground-truth captions of each image (at least one each; COCO has about 5).
        max_order (`int`, *optional*, defaults to 4):
            The largest n-gram order.
        sigma (`float`, *optional*, defaults to 6.0):
            The width of the length penalty.
        tokenize (`bool`, *optional*, defaults to `True`):
            Run `tokenize_caption` on every caption first. With `False` the captions are only split on whitespace,
            for text that is already PTB-tokenised and lower-cased.

    Returns:
        `float`: The corpus CIDEr-D, between 0 and 10.

    Example:

    ```python
    >>> from vlbridge.metrics.caption_metrics import cider_d
    >>> references = [
    ...     ["A dog runs on the grass.", "A brown dog running outside."],
    ...     ["Two cats sleep on a sofa.", "Cats sleeping on a couch."],
    ...     ["A red car parked on a street.", "A car parked by the road."],
    ... ]
    >>> round(cider_d(["a dog running on the grass", "two cats on a couch", "a red car"], references), 4)
    2.6176
    ```
    """
    return float(_cider_d_scores(predictions, references, max_order, sigma, tokenize).mean())


# The COCO scorer adds these to every count before dividing: a corpus with no matching n-gram of some order gets a tiny
# positive BLEU instead of a log(0), and an empty corpus gets no division by zero. Kept so the numbers match it.
_TINY, _SMALL = 1e-15, 1e-9


def bleu(
    predictions: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4, tokenize: bool = True
) -> dict[str, float]:
    """
    Corpus BLEU-1..`max_order` with pycocoevalcap's definition (`Bleu(4).compute_score`), the one behind the COCO
    caption numbers; it is cross-checked against pycocoevalcap like `cider_d`.

    Clipped n-gram matches (a candidate n-gram counts at most as often as in the reference that has it most) and
    candidate n-gram totals are summed over the corpus. BLEU-k is the geometric mean of the precisions of orders 1..k,
    times the brevity penalty `exp(1 - r / c)` when the total candidate length `c` is below `r`, the sum over images of
    the reference length closest to the candidate's (the shorter one on a tie). This "closest" length is the COCO
    choice; sacrebleu uses the same rule, NLTK's `corpus_bleu` too, but they differ in smoothing and tokenisation. Like
    pycocoevalcap, counts get tiny guards (1e-15 / 1e-9), so an order with no match gives a tiny positive value, not 0.

    Args:
        predictions (`list[str]`):
            One generated caption per image.
        references (`list[list[str]]`):
            The ground-truth captions of each image (at least one each).
        max_order (`int`, *optional*, defaults to 4):
            The largest n-gram order reported.
        tokenize (`bool`, *optional*, defaults to `True`):
            Run `tokenize_caption` on every caption first; with `False` captions are only split on whitespace.

    Returns:
        `dict[str, float]`: `{"bleu1": ..., "bleu2": ..., "bleu3": ..., "bleu4": ...}`, fractions in [0, 1].

    Example:

    ```python
    >>> from vlbridge.metrics.caption_metrics import bleu
    >>> references = [["A dog runs on the grass.", "A brown dog running outside."], ["Two cats sleep on a sofa."]]
    >>> scores = bleu(["a dog running on the grass", "two cats sleep on a couch"], references)
    >>> {key: round(value, 4) for key, value in scores.items()}
    {'bleu1': 0.9167, 'bleu2': 0.8563, 'bleu3': 0.7157, 'bleu4': 0.5913}
    ```
    """
    candidates, reference_tokens = _check_caption_inputs(predictions, references, tokenize)
    matches, totals = np.zeros(max_order), np.zeros(max_order)
    candidate_length = reference_length = 0
    for tokens, refs in zip(candidates, reference_tokens):
        counts = _ngram_counts(tokens, max_order)
        max_ref_counts: Counter = Counter()
        for ref in refs:
            max_ref_counts |= _ngram_counts(ref, max_order)  # element-wise max over the references
        for ngram, count in counts.items():
            matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        totals += [max(0, len(tokens) - order + 1) for order in range(1, max_order + 1)]
        candidate_length += len(tokens)
        reference_length += min((abs(len(ref) - len(tokens)), len(ref)) for ref in refs)[1]

    log_precisions = np.log((matches + _TINY) / (totals + _SMALL))
    ratio = (candidate_length + _TINY) / (reference_length + _SMALL)
    log_brevity = 1 - 1 / ratio if ratio < 1 else 0.0
    return {
        f"bleu{order}": float(math.exp(log_precisions[:order].sum() / order + log_brevity))
        for order in range(1, max_order + 1)
    }


# The answer processing of the official VQA evaluation (`vqaEval.py`): characters treated as punctuation, number words
# mapped to digits (including "none" -> "0"), articles, and the table restoring apostrophes in contractions.
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_VQA_DIGIT_COMMA = re.compile(r"\d,\d")
# The official pattern intends "a period not between digits", but its look-behind is mistyped as a look-ahead that
# always passes: in effect a period is dropped unless a digit follows it ("3.5" stays, "dog." and "5." lose it).
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# Keyed by the apostrophe-less spelling. The official table also has capitalised keys ("Im", "Ive", "Id've"); answers
# are lower-cased before the look-up, so those never fire and are left out. "somebody'd" -> "somebodyd" runs backwards
# in the official table too; it is kept so that scores stay identical.
_VQA_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def normalize_vqa_answer(answer: str) -> str:
    """
    Normalise a VQA answer with the rules of the official VQAv2 evaluation (`vqaEval.py`).

    In order: newlines and tabs become spaces and the ends are stripped; each punctuation character of
    `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !` is deleted when it touches a space somewhere in the answer (or when
    the answer has a comma between digits, as in "1,000") and otherwise replaced by a space; a period is deleted
    unless a digit follows it; the answer is lower-cased and split on whitespace; number words up to ten become digits
    ("two" -> "2", and "none" -> "0"); the articles a / an / the are dropped; contractions written without their
    apostrophe get it back ("isnt" -> "isn't"). Apostrophes, colons and other characters are kept.

    Args:
        answer (`str`):
            A predicted or ground-truth answer.

    Returns:
        `str`: The normalised answer (words separated by single spaces).

    Example:

    ```python
    >>> from vlbridge.metrics.caption_metrics import normalize_vqa_answer
    >>> answers = ["Two", "a dog.", "isnt", "yes!", "1,000", "3.5", "black-and-white"]
    >>> [normalize_vqa_answer(answer) for answer in answers]
    ['2', 'dog', "isn't", 'yes', '1000', '3.5', 'black and white']
    ```
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    # Whether to delete or to space out is decided on the answer before any replacement, as the official code does.
    delete_all = _VQA_DIGIT_COMMA.search(text) is not None
    processed = text
    for mark in _VQA_PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        processed = processed.replace(mark, "" if delete_all or touches_space else " ")
    processed = _VQA_PERIOD.sub("", processed)
    words = [_VQA_NUMBERS.get(word, word) for word in processed.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def _vqa_sample_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The accuracy of one answer against the (normalised) human answers of one question."""
    prediction = normalize_vqa_answer(prediction)
    answers = [normalize_vqa_answer(answer) for answer in answers]
    if len(answers) < 3:
        # min(1, matches / 3) could never reach 1 here; one agreeing reference is taken as full consensus.
        return float(prediction in answers)
    matches = sum(answer == prediction for answer in answers)
    # Leave each annotator out in turn and score against the others, then average (10 choose 9 subsets for VQAv2).
    return float(np.mean([min(1.0, (matches - (answer == prediction)) / 3) for answer in answers]))


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """
    VQA accuracy (Antol et al., 2015) as computed by the official VQAv2 evaluation, averaged over questions.

    Predicted and human answers are normalised with `normalize_vqa_answer`. With 3 or more human answers (VQAv2 has
    10), each annotator is left out in turn, the prediction scores `min(1, #matching other answers / 3)`, and the
    scores are averaged: an answer given by 1, 2, 3 or at least 4 of 10 annotators scores 0.3, 0.6, 0.9 or 1.0.
    With fewer than 3 reference answers (e.g. one ground-truth answer per question) that formula could never reach 1,
    so instead an answer matching any reference scores 1.0 and any other answer 0.0. Note that with exactly 3 answers
    the official formula applies, and unanimous references give 2/3 at most.

    One deliberate difference: the official script skips all normalisation for a question whose raw human answers are
    all identical. Here both sides are always normalised; this gives the same score in every other case and can only
    turn a formatting-only miss ("Yes." against ten "yes") into a hit.

    Args:
        predictions (`list[str]`):
            One predicted answer per question.
        references (`list[list[str]]`):
            The human answers of each question (at least one each).

    Returns:
        `float`: The mean accuracy, in [0, 1].

    Example:

    ```python
    >>> from vlbridge.metrics.caption_metrics import vqa_accuracy
    >>> vqa_accuracy(["Two", "a dog."], [["2"], ["dog"]])
    1.0
    >>> humans = ["red", "red", "blue", "blue", "blue", "blue", "blue", "blue", "blue", "blue"]  # 2 of 10 say "red"
    >>> round(vqa_accuracy(["red"], [humans]), 4)
    0.6
    ```
    """
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} lists of reference answers.")
    if len(predictions) == 0:
        raise ValueError("VQA accuracy needs at least one question.")
    scores = []
    for index, (prediction, answers) in enumerate(zip(predictions, references)):
        if isinstance(answers, str):
            raise TypeError(f"Answers of question {index} must be a list of strings, e.g. [{answers!r}].")
        if len(answers) == 0:
            raise ValueError(f"Question {index} has no reference answer.")
        scores.append(_vqa_sample_accuracy(prediction, answers))
    return float(np.mean(scores))


__all__ = ["bleu", "cider_d", "normalize_vqa_answer", "tokenize_caption", "vqa_accuracy"]
