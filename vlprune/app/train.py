"""Train the embedded model from scratch on the shapes task: ``python -m vlprune.app.train --out DIR``.

Seeded and resumable (a checkpoint every ``--every`` steps in ``DIR/checkpoint.pt``; ``--resume`` continues from
it with the same data order). The data is generated on the fly: step ``i`` uses training seeds ``i * batch ...``,
so no scene is shared with the validation or test splits.

Objective: the answer tokens (cross-entropy after ``answer :``), plus auxiliary objectives, as the issue's remedies
suggest. For the vision tower: every patch predicts the object class and the letter under its centre
(:func:`vlprune.app.shapes.patch_labels`), and the [CLS] token predicts which (colour, shape) pairs and which letter the
scene holds, so that [CLS] attention means something, as in CLIP. Between them: each projected patch, read through
the decoder's (tied) output embedding, names the colour, shape and quadrant of the object under it, or the letter
(:func:`vlprune.app.shapes.patch_words`), so that a question's words and the visual tokens they refer to start out
close; and each projected patch predicts its own row and column, so that where a patch lies is in the features the
decoder reads (its rotary positions are 1-D). For the decoder: a share of each batch
(``--captions``) asks "describe the scene ?" and is answered by a caption listing every object's colour, shape and
quadrant (:func:`vlprune.app.shapes.describe`), which gives many grounded target words per image where a question gives
one. Learning rate: linear warm-up, then cosine decay. The auxiliary heads are not part of the saved model.

``--stop N`` ends a run after step ``N`` (its schedule still spans ``--steps``); ``--resume --vision`` then starts a
vision phase (the vision tower, projector, embeddings and auxiliary heads trained on the auxiliary losses alone, no
decoder pass: a fast way to train the vision side further, or to add an auxiliary head), and ``--resume --decoder`` a
decoder phase: the decoder layers are re-initialised and trained alone on the answers (their own warm-up and cosine
decay over the steps left), on top of the frozen vision tower, projector and embeddings. That is a way to let a
fresh decoder learn lookups that an end-to-end run, whose decoder settles on heuristics while the vision side is
still learning, never finds. The shipped weights: an end-to-end run, then a decoder phase, then that decoder phase
extended twice with ``--resume --steps`` (their ``training.json`` has each run's settings and the validation log).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import embedded, shapes
from .shapes import ask

CLASSES = 1 + len(shapes.COLORS) * len(shapes.SHAPES)


def pixels(images) -> torch.Tensor:
    """CLIP-normalised (B, 3, H, W) pixels, equal to what the processor produces for ``shapes.SIZE`` px images."""
    array = torch.from_numpy(np.stack([np.asarray(im) for im in images])).float().div(255).permute(0, 3, 1, 2)
    mean, std = torch.tensor(embedded.MEAN)[:, None, None], torch.tensor(embedded.STD)[:, None, None]
    return (array - mean) / std


def more_questions(s: shapes.Sample, n: int) -> list[tuple[str, str]]:
    """Up to ``n`` further ``(question, answer)`` pairs about the scene of ``s``, of the other question types."""
    rng = random.Random(f"more:{s.seed}")
    out = []
    for kind in shapes.QUESTION_TYPES:
        qa = ask(s.scene, kind, rng) if kind != s.kind and len(out) < n else None
        if qa is not None:
            out.append(qa)
    return out


def batch(samples, vocab: dict[str, int], extra: list[list[tuple[str, str]]] | None = None):
    """Inputs, answer labels and auxiliary targets of a list of :class:`~vlprune.app.shapes.Sample`. ``extra[i]`` are
    further ``(question, answer)`` pairs about sample ``i``'s scene, asked after its first answer in the same
    sequence (each answer is a target; the first question sits where it sits at inference)."""
    tokens = (shapes.SIZE // shapes.PATCH) ** 2
    rows, labels = [], []
    for i, s in enumerate(samples):
        ids, target = [embedded.BOS], [-100]
        for n, (question, answer) in enumerate([(s.question, s.answer)] + (extra[i] if extra else [])):
            words = embedded.prompt(question).split() if n == 0 else [*question.split(), "answer", ":"]
            asked = [t for w in words for t in ([embedded.IMAGE] * tokens if w == embedded.IMAGE_TOKEN else [vocab[w]])]
            said = [vocab[w] for w in answer.split()] + [embedded.EOS]
            ids += asked + said
            target += [-100] * len(asked) + said
        rows.append(ids)
        labels.append(target)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), embedded.PAD)
    target = torch.full((len(rows), length), -100)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels, strict=True)):  # right padding: positions as at inference
        ids[i, : len(r)], target[i, : len(y)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(y), 1
    objects, letters, present = [], [], torch.zeros(len(samples), CLASSES - 1 + len(shapes.LETTERS))
    words = torch.zeros(len(samples), tokens, len(vocab))
    for i, s in enumerate(samples):
        for p, names in enumerate(shapes.patch_words(s.scene)):
            words[i, p, [vocab[n] for n in names]] = 1
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
        words=words,
    )


class Heads(nn.Module):
    """Auxiliary heads (training only): object class, letter and scene contents on the vision tower's feature layer
    (width ``width``); each patch's row and column on the projected features (width ``text``), so that where a patch
    lies reaches the decoder in its features."""

    def __init__(self, width: int, text: int) -> None:
        super().__init__()
        side = shapes.SIZE // shapes.PATCH
        self.objects = nn.Linear(width, CLASSES)
        self.letters = nn.Linear(width, 1 + len(shapes.LETTERS))
        self.present = nn.Linear(width, CLASSES - 1 + len(shapes.LETTERS))
        self.rows = nn.Linear(text, side)
        self.cols = nn.Linear(text, side)


def forward(model, heads: Heads, b: dict, decoder: bool = True):
    """``(answer loss, auxiliary loss, answer logits (B, L, V))`` of one batch; without ``decoder`` only the
    auxiliary loss is computed (the answer loss and logits are ``None``)."""
    base = model.model
    vision = base.vision_tower(b["pixels"], output_hidden_states=True).hidden_states[-1]  # (B, 1 + P, Dv)
    features = base.multi_modal_projector(vision[:, 1:])
    aux = nn.functional.cross_entropy(heads.objects(vision[:, 1:]).flatten(0, 1), b["objects"].flatten())
    aux = aux + nn.functional.cross_entropy(heads.letters(vision[:, 1:]).flatten(0, 1), b["letters"].flatten())
    aux = aux + nn.functional.binary_cross_entropy_with_logits(heads.present(vision[:, 0]), b["present"])
    side = shapes.SIZE // shapes.PATCH
    grid = torch.arange(side * side).expand(features.shape[0], -1)
    aux = aux + nn.functional.cross_entropy(heads.rows(features).flatten(0, 1), (grid // side).flatten())
    aux = aux + nn.functional.cross_entropy(heads.cols(features).flatten(0, 1), (grid % side).flatten())
    # grounding: each projected patch, read through the (tied) output embedding, names what lies under it
    named = model.lm_head(features)[..., : b["words"].shape[-1]]
    aux = aux + 10 * nn.functional.binary_cross_entropy_with_logits(named, b["words"])
    if not decoder:
        return None, aux, None
    embeds = base.get_input_embeddings()(b["ids"])
    embeds = embeds.masked_scatter((b["ids"] == embedded.IMAGE)[..., None], features.to(embeds.dtype))
    hidden = base.language_model(inputs_embeds=embeds, attention_mask=b["mask"]).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), b["target"][:, 1:].flatten(), ignore_index=-100)
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


def checkpoint_phase(state: dict | None) -> dict:
    """The phase a checkpoint was saved in: ``{"kind": "joint" | "vision" | "decoder", "from": first step}``."""
    if state is None:
        return {"kind": "joint", "from": 0}
    if "phase" in state:
        return state["phase"]
    if state.get("decoder_from") is not None:  # checkpoints from before the vision phase existed
        return {"kind": "decoder", "from": state["decoder_from"]}
    return {"kind": "joint", "from": 0}


def is_decoder(name: str) -> bool:
    """Whether parameter ``name`` belongs to the decoder phase's trainable part: the decoder layers and final norm."""
    return ".language_model.layers." in name or ".language_model.norm." in name


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to save the trained model (a folder)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--aux", type=float, default=1.0, help="weight of the auxiliary vision losses")
    parser.add_argument("--captions", type=float, default=0.25, help="share of each batch that is a caption")
    parser.add_argument(
        "--questions", type=int, default=1, help="questions per training sequence (further ones about the same scene)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=250, help="validate and checkpoint every N steps")
    parser.add_argument("--validation", type=int, default=600, help="validation questions at each checkpoint")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--stop", type=int, default=None, help="stop after step N (the schedule still spans --steps)")
    phase = parser.add_mutually_exclusive_group()
    phase.add_argument(
        "--vision",
        action="store_true",
        help="vision phase: from this run's first step, train only the vision tower, projector, embeddings and "
        "auxiliary heads, on the auxiliary losses (no decoder pass); its own warm-up and cosine decay",
    )
    phase.add_argument(
        "--decoder",
        action="store_true",
        help="decoder phase: from this run's first step, re-initialise the decoder layers and train only them (and "
        "the final norm) on the answers, with the vision tower, projector and embeddings frozen; its own warm-up and "
        "cosine decay over the steps left",
    )
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, processor = embedded.build_model(seed=args.seed), embedded.build_processor()
    vocab = processor.tokenizer.get_vocab()
    heads = Heads(model.config.vision_config.hidden_size, model.config.text_config.hidden_size)
    checkpoint = args.out / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False) if args.resume and checkpoint.is_file() else None
    start = state["step"] if state else 0
    if state:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"], strict=False)  # heads added since start fresh
    current = checkpoint_phase(state)
    wanted = "vision" if args.vision else "decoder" if args.decoder else current["kind"]
    if current["kind"] != wanted:  # entering a phase: its own optimiser and schedule from this step
        current = {"kind": wanted, "from": start}
        if wanted == "decoder":  # a fresh decoder on the trained vision side
            fresh = embedded.build_model(seed=args.seed + 1).state_dict()
            model.load_state_dict({k: v for k, v in fresh.items() if is_decoder(k)}, strict=False)
    if current["kind"] == "joint":
        params = list(model.parameters()) + list(heads.parameters())
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(is_decoder(name) == (current["kind"] == "decoder"))
        params = [p for p in model.parameters() if p.requires_grad]
        params += list(heads.parameters()) if current["kind"] == "vision" else []
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    origin = current["from"]  # each phase has its own warm-up and decay

    def rate(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - origin - args.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    log, phases = (state["log"], state.get("phases", [])) if state else ([], [])
    if state and checkpoint_phase(state) == current:  # same optimiser as the checkpoint
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("out", "resume")}
    phases = [p for p in phases if int(p["from_step"]) < start] + [{"from_step": start, **settings}]
    validation = shapes.split("validation", args.validation)
    model.train()
    began = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training")
    for step in bar:
        first = shapes.SPLITS["train"] + step * args.batch
        kinds = shapes.QUESTION_TYPES
        samples = [shapes.sample(first + i, kinds[(first + i) % len(kinds)]) for i in range(args.batch)]
        for s in samples[: round(args.captions * args.batch)]:  # the first samples become captions
            s.question, s.answer, s.kind = "describe the scene ?", shapes.describe(s.scene), "describe"
        captions = round(args.captions * args.batch)
        extra = [[] if i < captions else more_questions(s, args.questions - 1) for i, s in enumerate(samples)]
        loss, aux, _ = forward(model, heads, batch(samples, vocab, extra), decoder=current["kind"] != "vision")
        optimizer.zero_grad(set_to_none=True)
        kind = current["kind"]
        (aux if kind == "vision" else loss if kind == "decoder" else loss + args.aux * aux).backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        answers = None if loss is None else loss.item()  # the vision phase has no answer loss
        bar.set_postfix(loss="-" if answers is None else f"{answers:.3f}", aux=f"{aux.item():.3f}")
        stopping = args.stop is not None and step + 1 >= args.stop
        if stopping:
            phases[-1]["stopped_at"] = step + 1
        if (step + 1) % args.every == 0 or step + 1 == args.steps or stopping:
            scores = evaluate(model, heads, validation, vocab)
            log.append({"step": step + 1, "loss": answers, "aux": aux.item(), "seconds": time.time() - began, **scores})
            bar.write(f"step {step + 1}: " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
            state = dict(model=model.state_dict(), heads=heads.state_dict(), optimizer=optimizer.state_dict())
            state.update(schedule=schedule.state_dict(), step=step + 1, log=log, phases=phases)
            state.update(phase=current)
            torch.save(state, checkpoint)
        if stopping:
            break
    model.eval()
    save(model, processor, args.out, log, phases)
    print(f"saved to {args.out} after {time.time() - began:.0f} s this run")


def save(model, processor, out: Path, log: list[dict], phases: list[dict]) -> None:
    """The model and processor (``save_pretrained``) and ``training.json``: the settings of each run that made it
    (``phases``: a resumed run may change them), the machine and the validation log (per-type teacher-forced
    accuracy and elapsed seconds of its run at every checkpoint)."""
    import json
    import os
    import platform

    model.save_pretrained(out)
    processor.save_pretrained(out)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    machine["threads"] = torch.get_num_threads()
    card = {"phases": phases, "machine": machine, "log": log}
    (out / "training.json").write_text(json.dumps(card, indent=1) + "\n")


if __name__ == "__main__":
    main()
