"""Train the embedded model from scratch on the shapes task: ``python -m vlprune.train --out DIR``.

Seeded and resumable (a checkpoint every ``--every`` steps in ``DIR/checkpoint.pt``; ``--resume`` continues from
it with the same data order). The data is generated on the fly: step ``i`` uses training seeds ``i * batch ...``,
so no scene is shared with the validation or test splits.

Objective: the answer tokens (cross-entropy after ``answer :``), plus auxiliary objectives, as the issue's remedies
suggest. For the vision tower: every patch predicts the object class and the letter under its centre
(:func:`vlprune.shapes.patch_labels`), and the [CLS] token predicts which (colour, shape) pairs and which letter the
scene holds, so that [CLS] attention means something, as in CLIP. For the decoder: a share of each batch
(``--captions``) asks "describe the scene ?" and is answered by a caption listing every object's colour, shape and
quadrant (:func:`vlprune.shapes.describe`), which gives many grounded target words per image where a question gives
one. Learning rate: linear warm-up, then cosine decay. The auxiliary heads are not part of the saved model.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import embedded, shapes

CLASSES = 1 + len(shapes.COLORS) * len(shapes.SHAPES)


def pixels(images) -> torch.Tensor:
    """CLIP-normalised (B, 3, H, W) pixels, equal to what the processor produces for ``shapes.SIZE`` px images."""
    array = torch.from_numpy(np.stack([np.asarray(im) for im in images])).float().div(255).permute(0, 3, 1, 2)
    mean, std = torch.tensor(embedded.MEAN)[:, None, None], torch.tensor(embedded.STD)[:, None, None]
    return (array - mean) / std


def batch(samples, vocab: dict[str, int]):
    """Inputs, answer labels and auxiliary targets of a list of :class:`~vlprune.shapes.Sample`."""
    tokens = (shapes.SIZE // shapes.PATCH) ** 2
    rows, labels = [], []
    for s in samples:
        question = [vocab[w] for w in embedded.prompt(s.question).split()[1:]]
        answer = [vocab[w] for w in s.answer.split()] + [embedded.EOS]
        ids = [embedded.BOS] + [embedded.IMAGE] * tokens + question + answer
        rows.append(ids)
        labels.append([-100] * (len(ids) - len(answer)) + answer)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), embedded.PAD)
    target = torch.full((len(rows), length), -100)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels, strict=True)):  # right padding: positions as at inference
        ids[i, : len(r)], target[i, : len(y)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(y), 1
    objects, letters, present = [], [], torch.zeros(len(samples), CLASSES - 1 + len(shapes.LETTERS))
    for i, s in enumerate(samples):
        o, le = shapes.patch_labels(s.scene)
        objects.append(o)
        letters.append(le)
        for c in set(o) - {0}:
            present[i, c - 1] = 1
        if s.scene.letter is not None:
            present[i, CLASSES - 1 + shapes.LETTERS.index(s.scene.letter.color)] = 1
    images = [shapes.render(s.scene) for s in samples]
    return dict(
        ids=ids,
        mask=mask,
        target=target,
        pixels=pixels(images),
        objects=torch.tensor(objects),
        letters=torch.tensor(letters),
        present=present,
    )


class Heads(nn.Module):
    """Auxiliary heads on the vision tower's feature layer (training only)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.objects = nn.Linear(width, CLASSES)
        self.letters = nn.Linear(width, 1 + len(shapes.LETTERS))
        self.present = nn.Linear(width, CLASSES - 1 + len(shapes.LETTERS))


def forward(model, heads: Heads, b: dict):
    """``(answer loss, auxiliary loss, answer logits (B, L, V))`` of one batch."""
    base = model.model
    vision = base.vision_tower(b["pixels"], output_hidden_states=True).hidden_states[-1]  # (B, 1 + P, Dv)
    features = base.multi_modal_projector(vision[:, 1:])
    embeds = base.get_input_embeddings()(b["ids"])
    embeds = embeds.masked_scatter((b["ids"] == embedded.IMAGE)[..., None], features.to(embeds.dtype))
    hidden = base.language_model(inputs_embeds=embeds, attention_mask=b["mask"]).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), b["target"][:, 1:].flatten(), ignore_index=-100)
    aux = nn.functional.cross_entropy(heads.objects(vision[:, 1:]).flatten(0, 1), b["objects"].flatten())
    aux = aux + nn.functional.cross_entropy(heads.letters(vision[:, 1:]).flatten(0, 1), b["letters"].flatten())
    aux = aux + nn.functional.binary_cross_entropy_with_logits(heads.present(vision[:, 0]), b["present"])
    return loss, aux, logits


@torch.no_grad()
def evaluate(model, heads, samples, vocab, size: int = 100) -> dict[str, float]:
    """Teacher-forced accuracy of the first answer token, per question type and overall."""
    model.eval()
    right: dict[str, list[int]] = {}
    for start in range(0, len(samples), size):
        part = samples[start : start + size]
        b = batch(part, vocab)
        _, _, logits = forward(model, heads, b)
        first = (b["target"][:, 1:] != -100).float().argmax(1)
        guess = logits[torch.arange(len(part)), first].argmax(-1)
        truth = b["target"][:, 1:][torch.arange(len(part)), first]
        for s, ok in zip(part, (guess == truth).tolist(), strict=True):
            right.setdefault(s.kind, []).append(ok)
    model.train()
    out = {k: sum(v) / len(v) for k, v in right.items()}
    out["all"] = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=embedded.default_path(), help="where to save the trained model")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--aux", type=float, default=1.0, help="weight of the auxiliary vision losses")
    parser.add_argument("--captions", type=float, default=0.25, help="share of each batch that is a caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=250, help="validate and checkpoint every N steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, processor = embedded.build_model(seed=args.seed), embedded.build_processor()
    vocab = processor.tokenizer.get_vocab()
    heads = Heads(model.config.vision_config.hidden_size)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def rate(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    checkpoint = args.out / "checkpoint.pt"
    start, log = 0, []
    if args.resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, log = state["step"], state["log"]
    validation = shapes.split("validation", 600)
    model.train()
    began = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training")
    for step in bar:
        first = shapes.SPLITS["train"] + step * args.batch
        kinds = shapes.QUESTION_TYPES
        samples = [shapes.sample(first + i, kinds[(first + i) % len(kinds)]) for i in range(args.batch)]
        for s in samples[: round(args.captions * args.batch)]:
            s.question, s.answer, s.kind = "describe the scene ?", shapes.describe(s.scene), "describe"
        loss, aux, _ = forward(model, heads, batch(samples, vocab))
        optimizer.zero_grad(set_to_none=True)
        (loss + args.aux * aux).backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux.item():.3f}")
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            scores = evaluate(model, heads, validation, vocab)
            log.append({"step": step + 1, "loss": loss.item(), "seconds": time.time() - began, **scores})
            bar.write(f"step {step + 1}: " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
            state = dict(model=model.state_dict(), heads=heads.state_dict(), optimizer=optimizer.state_dict())
            torch.save({**state, "schedule": schedule.state_dict(), "step": step + 1, "log": log}, checkpoint)
    model.eval()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"saved to {args.out} after {time.time() - began:.0f} s this run")


if __name__ == "__main__":
    main()
