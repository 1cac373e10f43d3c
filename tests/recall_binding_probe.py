"""Does a two-fact recall model tell the facts apart, or answer with a blend of both codes?

    PYTHONPATH=. python tests/recall_binding_probe.py CHECKPOINT.pt [EPISODES]

On EPISODES (default 128) episodes of the ladder's stream at the run's longest distance, at
every answer digit whose value differs from the other fact's digit in the same place, it
prints the mean probability the model gives to the queried fact's digit, to the other
fact's digit, and to the other digits; then the share of queries answered
exactly with the queried code and with the other code, for the first and the second query
of the episode, with the two probabilities by the digit's place in the code. A model that reads both facts without binding them to their names puts
about half of its mass on each code: asked first, it is then right half of the time.
"""
import sys

import torch
import torch.nn.functional as F

import dnc_gpt2 as D
from recall_ladder import saved_model  # tests/ is on the path of a script run from it


def codes_of(episodes, kind):
    """(n, facts, 4) the digit ids at the positions of class `kind`, in episode order."""
    where = episodes.classes[:, :-1] == D.TOKEN_CLASSES.index(kind)
    return episodes.ids[:, :-1][where].view(len(where), -1, 4)


def digit_probs(model, episodes, cfg, digits):
    """(n, facts, 4, 10) the model's probabilities of the ten digits where it predicts answers."""
    n, length = episodes.answers.shape
    probs = torch.zeros(n, length, len(digits))
    for first in range(0, n, cfg.batch_size):
        rows = slice(first, first + cfg.batch_size)
        part, state = D.Episodes(*(x[rows] for x in episodes)), None
        for start, (ids, mask) in zip(range(0, length, cfg.seq_len),
                                      D.episode_segments(part, cfg.seq_len)):
            out = model(ids[:, :-1], scored=mask, memory_state=state)
            state = out.memory_state
            probs[rows, start:start + cfg.seq_len][mask] = F.softmax(out.logits.float(), -1)[:, digits]
    return probs[episodes.answers].view(n, cfg.recall_facts, 4, len(digits))


def main():
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    cfg, model, task, episodes = saved_model(sys.argv[1], n)
    if cfg.recall_facts != 2:
        sys.exit(f"recall_facts={cfg.recall_facts}: this probe compares two facts")
    value = torch.zeros(cfg.vocab_size, dtype=torch.long)
    value[task.digits] = torch.arange(10)
    facts, asked = value[codes_of(episodes, "fact code")], value[codes_of(episodes, "answer")]
    first_is_a = (asked[:, 0] == facts[:, 0]).all(-1)  # which fact the first query asks
    other = torch.where(first_is_a[:, None, None], facts.flip(1), facts)  # per query
    with torch.no_grad():
        probs = digit_probs(model, episodes, cfg, task.digits)
    right = probs.gather(-1, asked.unsqueeze(-1))[..., 0]
    wrong = probs.gather(-1, other.unsqueeze(-1))[..., 0]
    digits = probs.sum(-1)
    differs = asked != other
    print(f"{n} episodes, {int(differs.sum())} answer digits that differ between the facts: "
          f"p(queried fact) {right[differs].mean():.3f}, p(other fact) {wrong[differs].mean():.3f}, "
          f"p(neither) {(digits - right - wrong)[differs].mean():.3f}")
    predicted = probs.argmax(-1)
    for q, label in enumerate(("first", "second")):
        exact = (predicted[:, q] == asked[:, q]).all(-1).float().mean()
        swapped = (predicted[:, q] == other[:, q]).all(-1).float().mean()
        by_place = " ".join(f"{right[:, q, k][differs[:, q, k]].mean():.2f}/"
                            f"{wrong[:, q, k][differs[:, q, k]].mean():.2f}" for k in range(4))
        print(f"{label} query: exact {exact:.3f}, the other fact's code {swapped:.3f}; "
              f"p(queried)/p(other) by digit place {by_place}")


if __name__ == "__main__":
    main()
