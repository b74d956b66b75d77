"""The evaluation harness (paper section 5): a model adapter with two backends, resumable per-sample
JSONL, results.json and report.md. Tasks are plain modules (one a file, listed in TASKS) holding
their data loading and scoring; the harness only asks a backend for log-likelihoods or greedy text.

Log-likelihood follows lm-evaluation-harness's `hf` model exactly (the pair split of `_encode_pair`:
trailing spaces of the context move to the continuation, the continuation's ids are those of the whole
text past the context's own ids), so our numbers equal its numbers. Where it departs: it runs every
(context, continuation) as a full sequence; we prefill each context once into a KV cache (reusing the
tokens it shares with the previous context: the few-shot prefix of a subject is computed once), then
score all of a question's continuations in one batched forward over that cache (one-token choices,
MMLU's " A".." D", need no forward at all beyond the context's).
"""

from __future__ import annotations

import importlib
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from qwen2.files import atomic_write_text

TASKS = {  # name -> module: tasks are data + a scorer, no registry
    "mmlu": "qwen2.eval.mmlu",
    "arc_challenge": "qwen2.eval.arc",
    "hellaswag": "qwen2.eval.hellaswag",
    "ceval": "qwen2.eval.ceval",
    "cmmlu": "qwen2.eval.cmmlu",
    "gsm8k": "qwen2.eval.gsm8k",
    "math": "qwen2.eval.math",
    "humaneval": "qwen2.eval.humaneval_task",
    "mbpp": "qwen2.eval.mbpp",
    "perplexity": "qwen2.eval.perplexity",
    "needle": "qwen2.eval.needle",
}
ALIASES = {"arc": "arc_challenge", "arc_c": "arc_challenge", "arc-c": "arc_challenge"}
LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


class EndpointError(RuntimeError):
    """A server that refused, failed or timed out after every retry."""


# ---- task data --------------------------------------------------------------------------------
def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of one .jsonl / .json / .parquet / .csv data file."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
        return rows if isinstance(rows, list) else rows.get("data", [rows])
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def find_data(data_dir, task: str, patterns: Sequence[str], what: str) -> list[Path]:
    """The files of the first glob in `patterns` (under DATA/) that matches; FileNotFoundError naming what
    to put where otherwise."""
    if data_dir is None:
        raise FileNotFoundError(
            f"task {task!r} reads its data from --data DIR: put {what} under DIR/{patterns[0]}"
        )
    root = Path(data_dir)
    for pattern in patterns:
        files = sorted(p for p in root.glob(pattern) if p.is_file())
        if files:
            return files
    raise FileNotFoundError(
        f"{task}: no data file under {root}: put {what} at {root}/{patterns[0]} (.parquet or .jsonl)"
    )


def read_split(data_dir, task: str, patterns: Sequence[str], what: str) -> list[dict]:
    return [row for f in find_data(data_dir, task, patterns, what) for row in read_rows(f)]


def lm_eval_fewshot(pool: list, n: int, seed: int = LM_EVAL_FEWSHOT_SEED):
    """lm-eval's default ContextSampler for a few-shot split other than the test split: one Random(seed)
    drawing `n` docs per test doc, in test-doc order. Returns a function doc_index -> docs."""
    rnd, drawn = random.Random(seed), []

    def fewshot(i: int) -> list:
        while len(drawn) <= i:
            drawn.append(rnd.sample(pool, n) if n else [])
        return drawn[i]

    return fewshot


def load_task(name: str):
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return name, importlib.import_module(TASKS[name])


# ---- backends ---------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval HFLM._encode_pair: trailing spaces go to the continuation; continuation ids = the whole
    text's ids past the context's own ids; an empty context becomes <|endoftext|>."""
    if context == "":
        return [tokenizer.endoftext_id], tokenizer.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def truncate_pair(ctx: list[int], cont: list[int], keep: int) -> tuple[list[int], list[int]]:
    """Cut the context from the left so that context + continuation is at most `keep` tokens (lm-eval:
    hf keeps context + 1, its API models context - 1); a continuation alone longer is an error."""
    if len(cont) > keep - 1:
        raise ValueError(f"a continuation of {len(cont)} tokens leaves no room in a context of {keep - 1}")
    return ctx[max(0, len(ctx) + len(cont) - keep) :], cont


def truncate_prompt(ids: list[int], context: int, max_tokens: int) -> list[int]:
    """lm-eval's generate_until: a prompt keeps its last context - max_tokens tokens."""
    if max_tokens >= context:
        raise ValueError(f"max_tokens {max_tokens} leaves no room for a prompt in a context of {context}")
    return ids[-(context - max_tokens) :]


class InProcess:
    """A qwen2 model + tokenizer: log-likelihoods through a shared-prefix KV cache, greedy generation
    through qwen2.generation.generate in batches."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.config = model.config
        self.context = model.config.max_position_embeddings
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self._prefix: list[int] = []  # the context whose keys sit in self._pcache
        self._pcache = None
        self._ccaches: dict = {}  # rows -> continuation cache of that many rows (attention reads all)

    def _reserve(self, need: int) -> None:
        from qwen2.generation import KVCache

        if self._pcache is None or self._pcache.max_len < need:
            size = min(
                max(need, 2 * (self._pcache.max_len if self._pcache else 512)),
                self.config.max_position_embeddings,
            )
            self._pcache = KVCache(self.config, 1, size, dtype=self.dtype, device=self.device)
            self._ccaches, self._prefix = {}, []

    def _ccache(self, rows: int):
        from qwen2.generation import KVCache

        if rows not in self._ccaches:
            self._ccaches[rows] = KVCache(
                self.config, rows, self._pcache.max_len, dtype=self.dtype, device=self.device
            )
        return self._ccaches[rows]

    @torch.no_grad()
    def _score(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        from qwen2.generation import prefill

        n, longest = len(ctx), max(len(c) for c in conts)
        self._reserve(n + longest - 1)  # a continuation's last token is only a target, never an input
        common = 0
        # keep >= 1 new context token: its logits predict the first token of each choice
        for a, b in zip(self._prefix, ctx[: n - 1], strict=False):
            if a != b:
                break
            common += 1
        ids = torch.tensor([ctx[common:]], device=self.device)
        last = torch.log_softmax(prefill(self.model, ids, self._pcache, start=common)[0], -1)  # [V]
        self._prefix = ctx
        out: list[tuple[float, bool]] = []
        for s in range(0, len(conts), self.batch_size):
            chunk = conts[s : s + self.batch_size]
            if max(len(c) for c in chunk) == 1:  # one-token continuations: the context's logits suffice
                out += [(last[c[0]].item(), bool(last.argmax() == c[0])) for c in chunk]
                continue
            b, t = len(chunk), max(len(c) for c in chunk) - 1
            cache = self._ccache(b)
            for k_p, v_p, k_c, v_c in zip(self._pcache.k, self._pcache.v, cache.k, cache.v, strict=False):
                k_c[:, :, :n] = k_p[:, :, :n]  # the shared context, copied to every choice's row
                v_c[:, :, :n] = v_p[:, :, :n]
            tokens = torch.tensor([c[:-1] + [0] * (t + 1 - len(c)) for c in chunk], device=self.device)
            positions = (n + torch.arange(t, device=self.device)).expand(b, t)
            lp = torch.log_softmax(self.model(tokens, positions, cache).float(), -1)  # [b, t, V]
            for r, c in enumerate(chunk):
                rows = torch.cat([last[None], lp[r, : len(c) - 1]])  # row p predicts token p
                want = torch.tensor(c, device=self.device)
                out.append(
                    (rows[torch.arange(len(c)), want].sum().item(), bool((rows.argmax(-1) == want).all()))
                )
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(context, continuation) pairs -> (sum log p(continuation | context), continuation is greedy).
        A pair longer than the model's context keeps its last context + 1 tokens (lm-eval's hf model:
        the context is cut from the left, the continuation kept whole)."""
        enc = [truncate_pair(*encode_pair(self.tokenizer, c, x), self.context + 1) for c, x in pairs]
        out: list = [None] * len(pairs)
        i = 0
        while i < len(enc):  # consecutive pairs with the same context ids form one group
            j = i
            while j < len(enc) and enc[j][0] == enc[i][0]:
                j += 1
            for k, r in zip(range(i, j), self._score(enc[i][0], [e[1] for e in enc[i:j]]), strict=False):
                out[k] = r
            i = j
        return out

    @torch.no_grad()
    def token_losses(self, ids: Sequence[int]) -> torch.Tensor:
        """-log p(token t | tokens < t), t = 1..len-1, of one sequence: [len - 1] fp32 (loss by position)."""
        x = torch.tensor([list(ids)], device=self.device)
        h = self.model.hidden_states(x)[0, :-1]  # [T-1, H]
        out = []
        for s in range(0, h.shape[0], 1024):  # the [T, V] log-softmax a slice at a time
            lp = torch.log_softmax(self.model.logits(h[s : s + 1024]).float(), -1)
            out.append(-lp[torch.arange(lp.shape[0]), x[0, s + 1 : s + 1 + lp.shape[0]]])
        return torch.cat(out).cpu()

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_tokens: int) -> list[str]:
        from qwen2.generation import generate

        enc = [truncate_prompt(self.tokenizer.encode(p), self.context, max_tokens) for p in prompts]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))  # similar lengths share a batch
        out: list = [None] * len(enc)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            gen = generate(
                self.model,
                [enc[i] for i in idx],
                max_tokens,
                temperature=0.0,
                stop=list(stop) or None,
                tokenizer=self.tokenizer,
            )
            for _ in gen:
                pass
            for i, text in zip(idx, gen.texts, strict=False):
                out[i] = text
        return out

    def sample(
        self,
        prompts: Sequence[str],
        n: int,
        *,
        temperature: float,
        top_p: float = 1.0,
        max_tokens: int,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[str]]:
        """n sampled completions per prompt (pass@k, rejection sampling). Explicit SamplingParams, so a
        checkpoint's generation_config (top_k, penalties) never leaks in. Row r of prompt i draws with
        seed + i * n + r whatever the batching, so a seeded call is reproducible."""
        from qwen2.generation import generate
        from qwen2.sampling import SamplingParams

        out: list[list[str]] = []
        for i, prompt in enumerate(prompts):
            ids = truncate_prompt(self.tokenizer.encode(prompt), self.context, max_tokens)
            texts: list[str] = []
            for s in range(0, n, self.batch_size):
                rows = min(self.batch_size, n - s)
                params = SamplingParams(
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_tokens,
                    seed=None if seed is None else seed + i * n + s,
                    stop=list(stop),
                )
                gen = generate(self.model, [ids] * rows, params=params, tokenizer=self.tokenizer)
                for _ in gen:
                    pass
                texts += gen.texts
            out.append(texts)
        return out


class Endpoint:
    """An OpenAI-compatible server (ours, vLLM, SGLang): log-likelihood as lm-eval's local-completions
    (prompt ids, echo=true, logprobs=1, max_tokens=0), greedy text through /v1/completions; requests in
    a thread pool of `concurrency`, retried with exponential backoff on 429, 5xx and timeouts."""

    def __init__(
        self,
        base_url: str,
        tokenizer,
        api_key: str | None = None,
        concurrency: int = 8,
        model: str | None = None,
        retries: int = 6,
        timeout: float = 600.0,
    ):
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.tokenizer, self.api_key, self.concurrency = tokenizer, api_key, concurrency
        self.retries, self.timeout = retries, timeout
        card = self._request("GET", "/models")["data"][0]
        self.model = model or card["id"]
        self.context = int(card.get("max_model_len") or 32768)  # vLLM reports it; else Qwen2's 32K

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                if (e.code != 429 and e.code < 500) or attempt == self.retries:
                    raise EndpointError(f"{self.base}{path}: HTTP {e.code}: {e.read()[:500]!r}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise EndpointError(f"{self.base}{path}: {e} (after {attempt + 1} tries)") from None
            time.sleep(min(30.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def _map(self, fn, items):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """As lm-eval's local-completions, one request per question: the consecutive pairs sharing a
        context go together as a list of prompts (fewer round trips; a server with a prefix cache, ours
        or vLLM's, then computes the shared context once)."""
        enc = [truncate_pair(*encode_pair(self.tokenizer, *p), self.context - 1) for p in pairs]
        groups, i = [], 0
        while i < len(enc):
            j = i + 1
            while j < len(enc) and j - i < self.max_n and pairs[j][0] == pairs[i][0]:
                j += 1
            groups.append(enc[i:j])
            i = j

        def one(group):
            r = self._request(
                "POST",
                "/completions",
                {
                    "model": self.model,
                    "prompt": [ctx + cont for ctx, cont in group],
                    "echo": True,
                    "logprobs": 1,
                    "max_tokens": 0,
                    "temperature": 0,
                },
            )
            out = []
            for (ctx, _), c in zip(group, sorted(r["choices"], key=lambda c: c["index"]), strict=True):
                lp, n = c["logprobs"], len(ctx)
                greedy = all(
                    max(top, key=top.get) == tok
                    for tok, top in zip(lp["tokens"][n:], lp["top_logprobs"][n:], strict=False)
                )
                out.append((sum(lp["token_logprobs"][n:]), greedy))
            return out

        return [r for rs in self._map(one, groups) for r in rs]

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_tokens: int) -> list[str]:
        def one(prompt):
            body = {"model": self.model, "prompt": self._prompt(prompt, max_tokens), "max_tokens": max_tokens}
            body["temperature"] = 0
            if stop:
                body["stop"] = list(stop)[:4]  # the OpenAI API takes at most 4
            return self._request("POST", "/completions", body)["choices"][0]["text"]

        return self._map(one, prompts)

    def _prompt(self, prompt: str, max_tokens: int):
        """The text, or its last context - 1 - max_tokens ids where it is longer (lm-eval's API models)."""
        ids = self.tokenizer.encode(prompt)
        keep = truncate_prompt(ids, self.context - 1, max_tokens)
        return prompt if len(keep) == len(ids) else keep

    max_n = 16  # choices per request: our server's cap (OpenAI allows 128); larger n is split

    def sample(
        self,
        prompts: Sequence[str],
        n: int,
        *,
        temperature: float,
        top_p: float = 1.0,
        max_tokens: int,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[str]]:
        """n sampled completions per prompt through /v1/completions' `n`; a request of at most max_n
        choices each, request j of prompt i seeded seed + i * n + j * max_n."""
        jobs = [(i, s, min(self.max_n, n - s)) for i in range(len(prompts)) for s in range(0, n, self.max_n)]

        def one(job):
            i, s, k = job
            body = {
                "model": self.model,
                "prompt": self._prompt(prompts[i], max_tokens),
                "n": k,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
            }
            if seed is not None:
                body["seed"] = seed + i * n + s
            if stop:
                body["stop"] = list(stop)[:4]
            choices = sorted(self._request("POST", "/completions", body)["choices"], key=lambda c: c["index"])
            return [c["text"] for c in choices]

        out: list[list[str]] = [[] for _ in prompts]
        for (i, _, _), texts in zip(jobs, self._map(one, jobs), strict=True):
            out[i] += texts
        return out


# ---- resumable samples ----------------------------------------------------------------------------
class SampleLog:
    """OUT/samples/TASK.jsonl: one JSON line per finished sample, flushed and fsynced as it is written;
    on open, the lines already there (keyed by "id") are read back and a torn last line is cut off."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        good = 0
        if path.exists():
            data = path.read_bytes()
            for line in data.splitlines(keepends=True):
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                if not line.endswith(b"\n"):
                    break
                self.done[rec["id"]] = rec
                good += len(line)
            if good < len(data):
                with open(path, "r+b") as f:
                    f.truncate(good)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done[rec["id"]] = rec

    def close(self) -> None:
        self._f.close()


# ---- running tasks ------------------------------------------------------------------------------
def choice_metrics(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """lm-eval's multiple_choice: acc = argmax of log-likelihood; acc_norm = argmax of ll / len(choice
    in characters)."""
    lls = [r[0] for r in results]
    pred = max(range(len(lls)), key=lls.__getitem__)
    norm = [ll / max(1, len(c)) for ll, c in zip(lls, doc["choices"], strict=False)]
    pred_norm = max(range(len(norm)), key=norm.__getitem__)
    return {
        "lls": lls,
        "pred": pred,
        "acc": float(pred == doc["gold"]),
        "acc_norm": float(pred_norm == doc["gold"]),
    }


def run_task(
    backend,
    name: str,
    module,
    out: Path | None,
    *,
    data_dir=None,
    limit=None,
    shots=None,
    chunk: int = 16,
    samples: int = 1,
    temperature: float = 0.8,
    seed: int | None = 1234,
) -> dict:
    """Score every not-yet-written sample of one task; return its metrics (over all samples) and n.
    samples > 1 (tasks with score_samples: humaneval, mbpp): that many completions per question at
    `temperature`, pass@k for the task's PASS_KS up to `samples`."""
    from tqdm import tqdm

    if getattr(module, "KIND", "") == "custom":  # needle, perplexity: their own loop and outputs
        return module.run(backend, out=out, data_dir=data_dir, limit=limit, shots=shots)
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples must be an integer >= 1, got {samples!r}")
    if samples > 1 and not hasattr(module, "score_samples"):
        raise ValueError(f"{name}: --samples > 1 applies to code tasks (humaneval, mbpp) only")
    docs = module.load(data_dir, module.SHOTS if shots is None else shots)
    docs = docs[:limit] if limit else docs
    log = SampleLog((out or Path(".")) / "samples" / f"{name}.jsonl") if out else None
    done = log.done if log else {}
    # a record written with another sample count is scored again (its pass@k would be another metric)
    done = {k: r for k, r in done.items() if r.get("samples", 1) == samples}
    todo = [d for d in docs if d["id"] not in done]
    records = {d["id"]: done[d["id"]] for d in docs if d["id"] in done}
    bar = tqdm(total=len(docs), initial=len(docs) - len(todo), desc=name, unit="q")
    for s in range(0, len(todo), chunk):
        batch = todo[s : s + chunk]
        if module.KIND == "choice":
            res = backend.loglikelihood([(d["prompt"], c) for d in batch for c in d["continuations"]])
            k = 0
            for d in batch:
                m = len(d["continuations"])
                rec = {
                    "id": d["id"],
                    "prompt": d["prompt"],
                    "gold": d["gold"],
                    **choice_metrics(d, res[k : k + m]),
                }
                rec["greedy"] = [r[1] for r in res[k : k + m]]
                k += m
                records[d["id"]] = rec
                log and log.write(rec)
        elif samples > 1:
            outs = backend.sample(
                [d["prompt"] for d in batch],
                samples,
                temperature=temperature,
                max_tokens=module.MAX_TOKENS,
                stop=module.STOP,
                seed=None if seed is None else seed + s * samples,  # question j: rows j*N..
            )
            for d, texts in zip(batch, outs, strict=True):
                rec = {
                    "id": d["id"],
                    "prompt": d["prompt"],
                    "samples": samples,
                    "temperature": temperature,
                    "outputs": texts,
                    "reference": d["reference"],
                    **module.score_samples(d, texts),
                }
                records[d["id"]] = rec
                log and log.write(rec)
        else:
            texts = backend.generate([d["prompt"] for d in batch], module.STOP, module.MAX_TOKENS)
            for d, text in zip(batch, texts, strict=False):
                rec = {
                    "id": d["id"],
                    "prompt": d["prompt"],
                    "output": text,
                    "reference": d["reference"],
                    **module.score(d, text),
                }
                records[d["id"]] = rec
                log and log.write(rec)
        bar.update(len(batch))
    bar.close()
    if log:
        log.close()
    recs = [records[d["id"]] for d in docs]
    names = module.METRICS if samples == 1 else [f"pass@{k}" for k in module.PASS_KS if k <= samples]
    metrics = {m: sum(r[m] for r in recs) / max(1, len(recs)) for m in names}
    extra = {"samples": samples, "temperature": temperature} if samples > 1 else {}
    return {**metrics, "n": len(recs), "shots": module.SHOTS if shots is None else shots, **extra}


def make_backend(model_or_url, *, tokenizer=None, api_key=None, concurrency=8, batch_size=8):
    """A folder (checkpoint), a loaded Qwen2, or an http(s) URL -> a backend."""
    from qwen2.tokenizer.bpe import load_tokenizer

    if isinstance(model_or_url, str) and model_or_url.startswith(("http://", "https://")):
        tok = (
            tokenizer
            if not isinstance(tokenizer, (str, os.PathLike)) and tokenizer is not None
            else load_tokenizer(tokenizer or "Qwen2")
        )
        return Endpoint(model_or_url, tok, api_key=api_key, concurrency=concurrency)
    if isinstance(model_or_url, (str, os.PathLike)):
        from qwen2.checkpoint import load_model

        tok = (
            tokenizer
            if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike))
            else load_tokenizer(tokenizer or model_or_url)
        )
        return InProcess(load_model(model_or_url), tok, batch_size)
    if tokenizer is None:
        raise ValueError("evaluate(model, ...) with a loaded model needs tokenizer=")
    return InProcess(model_or_url, tokenizer, batch_size)


def write_report(out: Path, results: dict) -> None:
    lines = ["# Evaluation", "", "| task | metric | value | n | shots |", "|---|---|---|---|---|"]
    for task, r in results.items():
        for m, v in r.items():
            if m not in ("n", "shots") and isinstance(v, (int, float)):
                lines.append(f"| {task} | {m} | {v:.4f} | {r.get('n', '')} | {r.get('shots', '')} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def evaluate(
    model_or_url,
    tasks,
    *,
    data_dir=None,
    limit=None,
    shots=None,
    out=None,
    tokenizer=None,
    api_key=None,
    concurrency=8,
    batch_size=8,
    samples=1,
    temperature=0.8,
    seed=1234,
) -> dict:
    """Run `tasks` (names, or one comma-separated string) on a checkpoint folder, a loaded Qwen2 (with
    tokenizer=) or an OpenAI-compatible base URL. With `out`, samples go to OUT/samples/TASK.jsonl (a
    rerun skips those written), results to OUT/results.json and OUT/report.md. Returns
    {"task": {"metric": value, ..., "n": count}}. samples > 1 samples that many completions per problem
    of the code tasks (pass@k; other tasks in the same call stay greedy)."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    modules = [load_task(t) for t in names if t]
    backend = make_backend(
        model_or_url, tokenizer=tokenizer, api_key=api_key, concurrency=concurrency, batch_size=batch_size
    )
    out = Path(out) if out is not None else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, module in modules:
        results[name] = run_task(
            backend,
            name,
            module,
            out,
            data_dir=data_dir,
            limit=limit,
            shots=shots,
            samples=samples if hasattr(module, "score_samples") else 1,
            temperature=temperature,
            seed=seed,
        )
        if out:  # after every task, so a killed run keeps the finished tasks' results
            atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
            write_report(out, results)
    return results
