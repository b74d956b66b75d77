"""Online DPO (paper section 4.3): each step samples k replies per prompt with the current policy, a reward
model scores them, and its best and worst reply make the pair of one DPO step.

`OnlinePairs` is the loop's loader (train.loop.Trainer.fit pulls a batch before every optimizer step),
so online DPO is the DPO objective of the one loop over batches made on the fly. The Engine (continuous
batching) runs on the trainer's own model object: the update of step g is in the weights that sample
step g+1, with no save and reload; its prefix cache is reset before each episode, since cached keys
and values came from the old weights. Samples are seeded by (seed, micro-batch, prompt, sample), so a
run resumed from a checkpoint draws the same episodes. Ties (best == worst) give no pair; prompts are
drawn until the micro-batch has `batch_size` pairs or `max_tries` rounds ran.
"""

from __future__ import annotations

import time

import torch

from qwen2.train.examples import ExampleLoader


def reward_scorer(reward_model, tok, max_len: int, batch_size: int = 16):
    """(prompts [messages], replies [str]) -> scores [N] from a RewardModel, batched through one forward
    per `batch_size`, on the same rendering as its training pairs (data.conversations)."""
    from qwen2.data.conversations import encode_completion, pad

    device = next(reward_model.parameters()).device

    @torch.no_grad()
    def score(prompts: list[list[dict]], replies: list[str]) -> torch.Tensor:
        examples = [
            encode_completion(tok, p, [{"role": "assistant", "content": r}], max_len)
            for p, r in zip(prompts, replies, strict=True)
        ]
        out = []
        for s in range(0, len(examples), batch_size):
            ids = pad(examples[s : s + batch_size], reward_model.pad_token_id)["input_ids"]
            out.append(reward_model(ids.to(device)).cpu())
        return torch.cat(out)

    return score


def best_and_worst(scores: torch.Tensor) -> list[tuple[int, int] | None]:
    """scores [P, k] -> per prompt (best, worst) sample index, or None when all k tie."""
    out = []
    for row in scores:
        hi, lo = int(row.argmax()), int(row.argmin())
        out.append(None if row[hi] == row[lo] else (hi, lo))
    return out


class OnlinePairs:
    """The online-DPO loader: next() -> a DPO batch (chosen rows then rejected, reference log-probs) plus
    `episode` metrics (seconds spent sampling / scoring / on the reference, rewards, ties)."""

    def __init__(self, prompts, tok, policy, reference, score, cfg, rank: int = 0, world: int = 1):
        from qwen2.engine import Engine
        from qwen2.sampling import SamplingParams

        self.prompts, self.tok, self.policy, self.reference, self.score = (
            prompts,
            tok,
            policy,
            reference,
            score,
        )
        self.cfg, self.rank = cfg, rank
        self.stream = ExampleLoader.for_run(cfg, len(prompts), lambda micro, whole: micro, rank, world)
        self.engine = Engine(
            policy,
            max_num_seqs=max(1, cfg.batch_size * cfg.samples),
            max_model_len=cfg.max_len,
            max_num_batched_tokens=max(512, cfg.max_len),
        )
        stop = [tok.im_end_id, tok.endoftext_id]
        self.params = SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            stop_token_ids=stop,
        )

    @property
    def step_size(self) -> int:
        return self.stream.step_size

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def sample(self, prompt_ids: list[list[int]], seed: int) -> list[list[str]]:
        """k replies per prompt from the policy as it is now (text without the stop token)."""
        self.engine.reset_prefix_cache()
        k = self.cfg.samples
        rids = {}
        for i, ids in enumerate(prompt_ids):
            room = self.cfg.max_len - len(ids)
            if room < 1:
                raise ValueError(
                    f"online-dpo: a prompt of {len(ids)} tokens leaves no room to reply within "
                    f"max_len {self.cfg.max_len}"
                )
            for j in range(k):
                n = min(room, self.params.max_new_tokens)
                p = self.params.replace(seed=seed * 1_000_003 + i * 1009 + j, max_new_tokens=n)
                rids[self.engine.add_request(ids, p)] = (i, j)
        got: dict[str, list[int]] = {r: [] for r in rids}
        was_training = self.policy.training
        self.policy.eval()
        while self.engine.has_unfinished():
            for o in self.engine.step():
                got[o.request_id].extend(o.token_ids)
        self.policy.train(was_training)
        stops = set(self.params.stop_token_ids)
        out = [[""] * k for _ in prompt_ids]
        for r, (i, j) in rids.items():
            out[i][j] = self.tok.decode([t for t in got[r] if t not in stops])
        return out

    def __next__(self) -> dict:
        from qwen2.data.conversations import encode_completion, preference_batch
        from qwen2.tokenizer.chat import encode_chat
        from qwen2.train.posttrain_losses import label_logps

        cfg, k = self.cfg, self.cfg.samples
        t_sample = t_score = 0.0
        pairs, rewards, ties, best_r, worst_r = [], [], 0, [], []
        for _ in range(cfg.max_tries):
            seed = cfg.seed * 7919 + self.stream.micro
            micro = next(self.stream)
            msgs = [self.prompts[i] for i in micro]
            ids = [encode_chat(self.tok, m, add_generation_prompt=True)[0] for m in msgs]
            t0 = time.perf_counter()
            replies = self.sample(ids, seed)
            t1 = time.perf_counter()
            flat_prompts = [m for m in msgs for _ in range(k)]
            scores = self.score(flat_prompts, [r for rs in replies for r in rs]).view(len(msgs), k)
            t_sample, t_score = t_sample + t1 - t0, t_score + time.perf_counter() - t1
            rewards.append(scores.float().mean())
            for m, rs, pick, row in zip(msgs, replies, best_and_worst(scores), scores, strict=True):
                if pick is None:
                    ties += 1
                    continue
                best, worst = pick
                best_r.append(row[best])
                worst_r.append(row[worst])
                pairs.append(
                    tuple(
                        encode_completion(self.tok, m, [{"role": "assistant", "content": rs[j]}], cfg.max_len)
                        for j in (best, worst)
                    )
                )
            if len(pairs) >= cfg.batch_size:
                break
        if not pairs:
            raise RuntimeError(
                f"online-dpo: the reward model scored all {k} samples of every prompt equally in "
                f"{cfg.max_tries} rounds; raise temperature or samples, or check the reward model"
            )
        pairs = pairs[: cfg.batch_size]
        batch = preference_batch(pairs, self.tok.endoftext_id)
        batch["n_tokens"] = sum(len(e["input_ids"]) for pair in pairs for e in pair)
        t2 = time.perf_counter()
        device = next(self.reference.parameters()).device
        with torch.no_grad():
            batch["ref_logps"] = label_logps(
                self.reference, batch["input_ids"].to(device), batch["labels"].to(device)
            ).cpu()
        batch["episode"] = {
            "time/sampling_s": torch.tensor(t_sample),
            "time/scoring_s": torch.tensor(t_score),
            "time/reference_s": torch.tensor(time.perf_counter() - t2),
            "reward/mean": torch.stack(rewards).mean(),
            "reward/best": torch.stack(best_r[: cfg.batch_size]).mean().float(),
            "reward/worst": torch.stack(worst_r[: cfg.batch_size]).mean().float(),
            "pairs": torch.tensor(float(len(pairs))),
            "ties": torch.tensor(float(ties)),
        }
        return batch
