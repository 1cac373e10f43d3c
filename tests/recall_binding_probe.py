"""Does a two-fact recall model tell the facts apart, or answer with a blend of both codes?

    PYTHONPATH=. python tests/recall_binding_probe.py CHECKPOINT.pt [EPISODES]

On EPISODES (default 128) episodes of the ladder's stream at the run's longest distance, at
every answer digit whose value differs from the other fact's digit in the same place, it
prints the mean probability the model gives to the queried fact's digit, to the other
fact's digit and to the other digits. Then, for each query of the episode in order: its
exact match, how often the other fact's code is given instead, and the two probabilities
by the digit's place in the code. With two queries: the second query's exact match once
the first query's answer digits are replaced by random digits, which a model that answers
the second query by elimination (the code not yet given) then fails. A model that reads
both facts without binding them to their names splits each digit's mass between the two
codes. Then the first query's exact match split by whether the two names share their first
name, their last name or neither, and by whether the fact stated first or second is asked
(a fact whose code slots also hold the name stated before it would be confused one way more
than the other). Finally, where the reads go: at every position that
predicts an answer digit, the read weight (mean over heads) on the slots the queried fact's
code wrote, on those the other fact's code wrote, and elsewhere (with temporal links the
three need not sum to one), and how often the other fact's slots draw more. Reads that
favour the wrong fact are a fault of the name's addressing (the key, or the name in the
slot), not of the code's storage or of a read too blunt to single out one slot.
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
    return probs[episodes.answers].view(n, -1, 4, len(digits))


def exact_by_query(model, episodes, cfg, task, value):
    """(queries,) exact match of each query in the episode's order, and what main needs."""
    facts, asked = value[codes_of(episodes, "fact code")], value[codes_of(episodes, "answer")]
    is_first_fact = (asked == facts[:, :1]).all(-1, keepdim=True)  # (n, queries, 1)
    other = torch.where(is_first_fact, facts[:, 1:], facts[:, :1])  # the fact not asked
    with torch.no_grad():
        probs = digit_probs(model, episodes, cfg, task.digits)
    return (probs.argmax(-1) == asked).all(-1).float().mean(0), probs, asked, other


def dnc_trace(model, episodes, cfg):
    """(n, length, N) write weights and (n, length, R, N) read weights of the model's DNC at
    every position, from the eager loop, on which the model's outputs do not depend."""
    recorded = []

    def recording_step(state, iface):
        read, state = D.dnc_step(state, iface)
        recorded.append((state.write_weights, state.read_weights))
        return read, state

    memory = model.memory
    saved = memory.step, memory.kernel
    memory.step, memory.kernel = recording_step, "eager"
    try:
        with torch.no_grad():
            for first in range(0, len(episodes.ids), cfg.batch_size):
                part, state = D.Episodes(*(x[first:first + cfg.batch_size] for x in episodes)), None
                for ids, mask in D.episode_segments(part, cfg.seq_len):
                    state = model(ids[:, :-1], scored=mask, memory_state=state).memory_state
    finally:
        memory.step, memory.kernel = saved
    per_batch = len(episodes.answers[0])
    chunks = [recorded[i:i + per_batch] for i in range(0, len(recorded), per_batch)]
    writes = torch.cat([torch.stack([w for w, _ in c], 1) for c in chunks])
    reads = torch.cat([torch.stack([r for _, r in c], 1) for c in chunks])
    return writes, reads


def fact_read_mass(writes, reads, code_positions, answer_positions, queried, threshold=0.3):
    """(answers, 3): the read weight, mean over heads, on the queried fact's slots, on the other
    fact's and elsewhere, at each position that predicts an answer digit, for one episode.

    writes (length, N), reads (length, R, N); code_positions (2, 4): where each fact's code
    digits are; answer_positions (answers,) and queried (answers,): which fact each asks. A
    fact's slots are those its four code digits wrote with a total weight above threshold.
    """
    owned = writes[code_positions].sum(1) > threshold  # (2, N)
    own = owned[queried]  # (answers, N)
    other = owned[1 - queried]
    read = reads[answer_positions].mean(1)  # (answers, N)
    on_own = (read * own).sum(-1)
    on_other = (read * (other & ~own)).sum(-1)  # a slot both codes wrote counts as the queried
    return torch.stack([on_own, on_other, read.sum(-1) - on_own - on_other], -1)


def shared_name_word(tokenizer, name_ids):
    """Which word the two facts' names (lists of token ids, " First Last") have in common:
    "first", "last" or "neither"."""
    (first_a, last_a), (first_b, last_b) = (tokenizer.decode(ids).split() for ids in name_ids)
    return "first" if first_a == first_b else "last" if last_a == last_b else "neither"


def print_exact_by_shared_word(episodes, hits, tokenizer):
    """The first query's exact match (hits: (n,) bool) by shared_name_word."""
    name = D.TOKEN_CLASSES.index("fact name")
    groups = {"neither": [], "first": [], "last": []}
    for row, classes in enumerate(episodes.classes[:, :-1]):
        where = (classes == name).nonzero()[:, 0]
        runs = torch.tensor_split(where, (where.diff() > 1).nonzero()[:, 0] + 1)  # one per fact
        names = [episodes.ids[row, run].tolist() for run in runs]
        groups[shared_name_word(tokenizer, names)].append(bool(hits[row]))
    print("first query's exact by the word the two names share: " + ", ".join(
        f"{k} {sum(v) / len(v):.3f} ({len(v)} episodes)" for k, v in groups.items() if v))


def print_exact_by_fact_order(facts, asked, hits):
    """The first query's exact match (hits: (n,) bool) by whether it asks the fact stated first
    or second; facts (n, 2, 4) and asked (n, 4) are digit values. Episodes whose two codes are
    equal are left out: either fact answers them."""
    first, second = ((asked == facts[:, k]).all(-1) for k in (0, 1))
    parts = [f"{label} {hits[m].float().mean():.3f} ({int(m.sum())} episodes)"
             for label, m in (("stated first", first & ~second), ("second", second & ~first))]
    print("first query's exact by the fact it asks: " + ", ".join(parts))


def without_first_answer(episodes, digits, generator):
    """The episodes with the first query's four answer digits replaced by random digits."""
    ids = episodes.ids.clone()
    for row, classes in enumerate(episodes.classes):
        first = (classes == D.TOKEN_CLASSES.index("answer")).nonzero()[:4, 0]
        ids[row, first] = torch.tensor(digits)[torch.randint(10, (4,), generator=generator)]
    return D.Episodes(ids, episodes.answers, episodes.classes)


def main():
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    cfg, model, task, episodes = saved_model(sys.argv[1], n)
    if cfg.recall_facts != 2:
        sys.exit(f"recall_facts={cfg.recall_facts}: this probe compares two facts")
    value = torch.zeros(cfg.vocab_size, dtype=torch.long)
    value[task.digits] = torch.arange(10)
    exact, probs, asked, other = exact_by_query(model, episodes, cfg, task, value)
    right = probs.gather(-1, asked.unsqueeze(-1))[..., 0]
    wrong = probs.gather(-1, other.unsqueeze(-1))[..., 0]
    differs = asked != other
    print(f"{n} episodes, {int(differs.sum())} answer digits that differ between the facts: "
          f"p(queried fact) {right[differs].mean():.3f}, p(other fact) {wrong[differs].mean():.3f}, "
          f"p(neither) {(probs.sum(-1) - right - wrong)[differs].mean():.3f}")
    predicted = probs.argmax(-1)
    for q, label in enumerate(("first", "second")[:task.queries]):
        swapped = (predicted[:, q] == other[:, q]).all(-1).float().mean()
        by_place = " ".join(f"{right[:, q, k][differs[:, q, k]].mean():.2f}/"
                            f"{wrong[:, q, k][differs[:, q, k]].mean():.2f}" for k in range(4))
        print(f"{label} query: exact {exact[q]:.3f}, the other fact's code {swapped:.3f}; "
              f"p(queried)/p(other) by digit place {by_place}")
    if task.queries == 2:
        scrambled = without_first_answer(episodes, task.digits, torch.Generator().manual_seed(0))
        second = exact_by_query(model, scrambled, cfg, task, value)[0][1]
        print(f"second query with random digits in place of the first answer: exact {second:.3f}"
              " (elimination needs the first answer)")
    hits = (predicted[:, 0] == asked[:, 0]).all(-1)
    print_exact_by_shared_word(episodes, hits, D.load_tokenizer())
    print_exact_by_fact_order(value[codes_of(episodes, "fact code")], asked[:, 0], hits)
    print_read_mass(model, episodes, cfg, asked, value)


def print_read_mass(model, episodes, cfg, asked, value):
    """Where the reads go at the answers, over all episodes (fact_read_mass)."""
    writes, reads = dnc_trace(model, episodes, cfg)
    code = D.TOKEN_CLASSES.index("fact code")
    rows = []
    for row, classes in enumerate(episodes.classes[:, :-1]):
        code_positions = (classes == code).nonzero()[:, 0].view(2, 4)
        facts = value[episodes.ids[row, code_positions]]  # (2, 4)
        queried = (asked[row].unsqueeze(1) == facts).all(-1).long().argmax(-1)  # (queries,)
        answer_positions = episodes.answers[row].nonzero()[:, 0]
        rows.append(fact_read_mass(writes[row], reads[row], code_positions, answer_positions,
                                   queried.repeat_interleave(4)))
    mass = torch.cat(rows)
    print(f"reads at the {len(mass)} answer positions (mean over heads): the queried fact's code "
          f"slots {mass[:, 0].mean():.3f}, the other fact's {mass[:, 1].mean():.3f}, elsewhere "
          f"{mass[:, 2].mean():.3f}; the other fact's slots draw more at "
          f"{(mass[:, 1] > mass[:, 0]).float().mean():.3f} of them")


if __name__ == "__main__":
    main()
