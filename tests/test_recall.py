"""The long-range recall task: episodes, the answer-only loss, the credit path through the
memory, its metrics, and the memory's ability to learn on its own."""
import json
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dnc_gpt2 as D

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, mem_slots=8, mem_width=6, num_reads=2,
            seq_len=8, vocab_size=97, dropout=0.0, carry_memory=True, batch_size=2,
            lambda_routing=0.0, dataset="recall", loss_on="answers", max_steps=1)


@pytest.fixture(scope="module")
def task():
    return D.RecallGenerator(D.load_tokenizer(), 64, seed=5)


# ─── episodes ─────────────────────────────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def shifted_task():
    return D.RecallGenerator(D.load_tokenizer(), 64, seed=5, shift=True)


@pytest.mark.parametrize("distance", [16, 100, 256])
@pytest.mark.parametrize("layout", ["plain", "shifted"])
def test_episode_states_two_facts_then_asks_for_them_after_exactly_the_distance(
        task, shifted_task, distance, layout):
    task = {"plain": task, "shifted": shifted_task}[layout]
    tokenizer = D.load_tokenizer()
    episodes = task.episodes(random.Random(distance), distance, 6)
    n, length = episodes.answers.shape
    assert length % 64 == 0 and length == task.length(distance)
    assert episodes.ids.shape == (n, length + 1) and episodes.classes.shape == (n, length + 1)
    classes = {name: i for i, name in enumerate(D.TOKEN_CLASSES)}
    for row in range(n):
        ids, kinds = episodes.ids[row].tolist(), episodes.classes[row].tolist()
        answer_at = [j + 1 for j in episodes.answers[row].nonzero()[:, 0].tolist()]
        assert len(answer_at) == 8 and all(kinds[j] == classes["answer"] for j in answer_at)
        fact_code = [j for j, k in enumerate(kinds) if k == classes["fact code"]]
        assert len(fact_code) == 8
        # the facts, as text, give each queried name its code
        text = tokenizer.decode(ids)
        for first in (answer_at[0], answer_at[4]):
            code = tokenizer.decode(ids[first:first + 4])
            query = tokenizer.decode(ids[:first])
            name = query.rsplit(" What is the code of ", 1)[1].removesuffix(" ?")
            assert f" The code of {name} is{code} .\n" in text
            assert len(code.split()) == 4 and all(len(d) == 1 for d in code.split())
        # exactly `distance` filler tokens between the last fact and the first query
        last_fact = max(j for j, k in enumerate(kinds) if k in (classes["fact code"],
                                                                 classes["fact frame"]))
        first_query = min(j for j, k in enumerate(kinds) if k == classes["query"])
        assert first_query - last_fact - 1 == distance
        assert all(kinds[j] == classes["filler"] for j in range(last_fact + 1, first_query))
        # the code digits are tokens that no filler token shares
        digits = set(task.digits)
        assert not digits & {ids[j] for j, k in enumerate(kinds) if k == classes["filler"]}


@pytest.mark.parametrize("distance", [64, 256])
def test_shift_moves_the_same_facts_and_queries_anywhere_in_their_segments(task, shifted_task,
                                                                          distance):
    filler = D.TOKEN_CLASSES.index("filler")
    fact_at, end_at, plain_at = [], [], []
    for row in range(64):
        (ids, kinds, _), (s_ids, s_kinds, _) = (t.episode(random.Random(row), distance)
                                                for t in (task, shifted_task))
        assert len(s_ids) == len(ids) + 64  # one segment more of padding
        body, s_body = ([j for j, k in enumerate(c) if k != filler] for c in (kinds, s_kinds))
        # the shift is drawn after the episode's names, codes and filler: the same episode
        assert ids[body[0]:body[-1] + 1] == s_ids[s_body[0]:s_body[-1] + 1]
        plain_at.append(body[0] % 64)
        fact_at.append(s_body[0] % 64)
        end_at.append((s_body[-1] + 1) % 64)
    assert max(plain_at) - min(plain_at) < 16  # without the shift the facts hardly move
    # with it they start, and the queries end, in every quarter of a segment
    assert {a // 16 for a in fact_at} == {0, 1, 2, 3}
    assert {a // 16 for a in end_at} == {0, 1, 2, 3}


def test_binding_from_switches_the_facts_and_the_layout_at_the_same_step(task, shifted_task):
    """Training episodes state one fact in the fixed layout before binding_from, and
    recall_facts facts shifted from it on; validation and test always have both."""
    cfg = D.Config(**{**TINY, "seq_len": 64, "recall_distances": "64", "recall_shift": True,
                      "binding_from": 3})
    recall = D.RecallTask(cfg, shifted_task)
    for step, layout, facts in ((1, task, 1), (2, task, 1), (3, shifted_task, 2),
                                (4, shifted_task, 2)):
        batches, _, _ = recall.step_batches(step)
        expected = layout.train_batch(step, cfg.batch_size, [64], None, facts)
        assert torch.equal(torch.cat([b[:, :-1] for b in batches], 1), expected.ids[:, :-1])
    # the run's task, from which validation and test are drawn, is shifted at every step
    run_task = D.recall_generator(D.Config(**{**vars(cfg), "seed": 5}), D.load_tokenizer())
    assert torch.equal(run_task.split("valid", [64])[64].ids,
                       shifted_task.split("valid", [64])[64].ids)


def test_the_recall_preset_starts_binding_at_step_1501():
    """One fact in the fixed layout until step 1,500, two facts with one asked, shifted, from
    step 1,501; without the shift, the fixed layout at every step."""
    preset = D.config_from_args(["--preset=recall"])
    steps = (1, 1500, 1501, preset.max_steps)
    assert [D.binding(preset, step) for step in steps] == [False, False, True, True]
    assert [D.training_facts(preset, step) for step in steps] == [1, 1, 2, 2]
    assert [D.training_queries(preset, step) for step in steps] == [1, 1, 1, 1]
    assert [D.training_shift(preset, step) for step in steps] == [False, False, True, True]
    fixed = D.config_from_args(["--preset=recall", "--recall_shift=false"])
    D.validate_config(fixed)
    assert not any(D.training_shift(fixed, step) for step in steps)


def test_training_draws_fresh_episodes_each_step_reproducibly(task):
    a, b, again = (task.train_batch(step, 4, [64, 128]) for step in (1, 2, 1))
    assert torch.equal(a.ids, again.ids)  # a resumed run sees the same episodes
    assert a.ids.shape != b.ids.shape or not torch.equal(a.ids, b.ids)
    valid, test = task.split("valid", [64]), task.split("test", [64])
    assert len(test[64].ids) * task.facts == D.RECALL_EVAL_QUERIES["test"]
    assert not any(torch.equal(v, t) for v in valid[64].ids for t in test[64].ids[:16])


def test_segments_of_an_episode_follow_each_other(task):
    episodes = task.episodes(random.Random(0), 128, 3)
    segments = D.episode_segments(episodes, 64)
    assert len(segments) == episodes.answers.shape[1] // 64
    for (a, _), (b, _) in zip(segments, segments[1:]):
        assert torch.equal(a[:, -1], b[:, 0])
    assert torch.equal(torch.cat([m for _, m in segments], 1), episodes.answers)


# ─── the answer-only loss ─────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("use_dnc", [False, True])
def test_answer_loss_is_the_nll_of_the_scored_targets_of_the_full_logits(use_dnc):
    cfg = D.Config(**TINY)
    model = D.build_model(cfg, use_dnc).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [2, 5]] = mask[1, 7] = True
    with torch.no_grad():
        full = model(ids[:, :-1]).logits
        part = model(ids[:, :-1], scored=mask)
        loss, parts = D.compute_loss(part, ids[:, 1:][mask], cfg, use_dnc)
    assert part.logits.shape == (3, 97)
    by_hand = [-torch.log_softmax(full[r, t], -1)[ids[r, t + 1]] for r, t in ((0, 2), (0, 5),
                                                                               (1, 7))]
    assert parts["lm"] == pytest.approx(float(sum(by_hand) / 3), rel=1e-5)


def linked_segments(seed):
    """Three consecutive segments of two rows, and targets: 1 in the second, 6 in the third."""
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 97, (2, 9), generator=gen) for _ in range(3)]
    batches[1][:, 0], batches[2][:, 0] = batches[0][:, -1], batches[1][:, -1]
    masks = [torch.zeros(2, 8, dtype=torch.bool) for _ in range(3)]
    masks[1][0, 3] = True
    masks[2][:, 4:7] = True
    return batches, masks


def test_train_step_weights_segments_by_their_scored_targets():
    cfg = D.Config(**{**TINY, "grad_clip": 1e9})
    model = D.build_model(cfg, True)
    batches, masks = linked_segments(1)
    nll, state = [], None  # by hand: the mean NLL over the step's 7 scored targets
    for batch, mask in zip(batches, masks):
        out = model(batch[:, :-1], memory_state=state)
        state = out.memory_state
        log_p = torch.log_softmax(out.logits, -1)
        nll.append(-log_p[mask].gather(-1, batch[:, 1:][mask].unsqueeze(-1)).flatten())
    nll = torch.cat(nll)
    expected_grad, = torch.autograd.grad(nll.mean(), model.read_proj.weight)
    before = model.read_proj.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is minus the gradient
    sums, _, _ = D.train_step(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                              D.StepData(batches, masks, True), cfg, D.StopFlag(),
                              torch.device("cpu"))
    assert sums["tokens"] == 7
    assert sums["lm"] / sums["tokens"] == pytest.approx(nll.mean().item(), rel=1e-5)
    torch.testing.assert_close(before - model.read_proj.weight.detach(), expected_grad,
                               rtol=1e-4, atol=1e-7)


def test_train_step_reads_out_the_answers_not_the_other_scored_targets():
    cfg = D.Config(**{**TINY, "grad_clip": 1e9, "answer_readout": 0.5})
    model = D.build_model(cfg, True)
    batches, answers = linked_segments(2)
    scored = [mask.clone() for mask in answers]
    for mask in scored:
        mask[:, 1] = True  # a context target in every segment, not an answer
    total, state = 0.0, None  # by hand: each segment's readout CE, weighted by its scored share
    for batch, mask, answer in zip(batches, scored, answers):
        out = model(batch[:, :-1], memory_state=state, answers=answer)
        state = out.memory_state
        if answer.any():
            log_p = torch.log_softmax(out.readout_logits, -1)
            nll = -log_p.gather(-1, batch[:, 1:][answer].unsqueeze(-1)).mean()
            total = total + nll * int(mask.sum()) / sum(int(m.sum()) for m in scored)
    expected_grad, = torch.autograd.grad(cfg.answer_readout * total, model.readout.weight)
    before = model.readout.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is minus the gradient
    sums, _, _ = D.train_step(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                              D.StepData(batches, scored, True, answers), cfg, D.StopFlag(),
                              torch.device("cpu"))
    assert sums["tokens"] == 2 + 3 + 8  # the scored targets: 1 + 6 answers, 6 others
    assert sums["readout"] / sums["tokens"] == pytest.approx(total.item(), rel=1e-5)
    torch.testing.assert_close(before - model.readout.weight.detach(), expected_grad,
                               rtol=1e-4, atol=1e-7)
    # and the task hands the loop its answers with the scored targets
    recall = D.RecallTask(D.Config(**{**TINY, "seq_len": 64, "recall_distances": "64",
                                      "context_stride": 8}), D.RecallGenerator(
                                          D.load_tokenizer(), 64, seed=5))
    data = D.step_data(recall, recall.cfg, 1)
    assert all(torch.equal(s & a, a) and (s & ~a).any() for s, a in zip(data.scored, data.answers)
               if a.any())


# ─── the credit path ──────────────────────────────────────────────────────────────────────

def three_segments(seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 97, (2, 9), generator=gen) for _ in range(3)]
    masks = [torch.zeros(2, 8, dtype=torch.bool) for _ in range(3)]
    masks[2][:, -2:] = True  # answers in the last segment only
    return batches, masks


@pytest.mark.parametrize("links", [False, True])
def test_answer_loss_reaches_the_writes_of_earlier_segments_of_its_step(links,
                                                                      record_interfaces):
    cfg = D.Config(**TINY, temporal_links=links)
    model = D.build_model(cfg, True)
    calls = record_interfaces(model)
    batches, masks = three_segments(2)
    D.train_step(model, model, torch.optim.SGD(model.parameters(), lr=0.0),
                 torch.amp.GradScaler("cpu", enabled=False), D.StepData(batches, masks, True),
                 cfg, D.StopFlag(), torch.device("cpu"))
    assert len(calls) == 3
    for field in ("write_vector", "write_gate", "write_key", "erase_vector"):
        grad = getattr(calls[0], field).grad  # segment 1: no loss of its own
        assert grad is not None and grad.abs().max() > 0, field
    # and at its first token, 2 segments and 15 tokens before the first answer (the memory is
    # empty then, so only what is written and how much can matter, not where or what is erased)
    for field in ("write_vector", "write_gate"):
        assert getattr(calls[0], field).grad[:, 0].abs().max() > 0, field


def test_no_gradient_crosses_an_optimizer_step(record_interfaces):
    cfg = D.Config(**TINY)
    model = D.build_model(cfg, True)
    calls = record_interfaces(model)
    batches, masks = three_segments(3)
    masks[0][:, -1] = True  # step 1 has a loss of its own
    args = (torch.optim.SGD(model.parameters(), lr=0.0), torch.amp.GradScaler("cpu", enabled=False))
    _, _, state = D.train_step(model, model, *args, D.StepData(batches[:1], masks[:1], True),
                               cfg, D.StopFlag(), torch.device("cpu"))
    before = calls[0].write_vector.grad.clone()
    D.train_step(model, model, *args, D.StepData(batches[1:], masks[1:], True), cfg,
                 D.StopFlag(), torch.device("cpu"), state=state)
    assert len(calls) == 3
    assert calls[1].write_vector.grad.abs().max() > 0  # step 2 reaches its own writes
    torch.testing.assert_close(calls[0].write_vector.grad, before, rtol=0, atol=0)


# ─── metrics ──────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("successes, trials", [(0, 200), (200, 200), (37, 200), (1, 7)])
def test_wilson_interval(successes, trials):
    z = 1.96
    low, high = D.wilson_interval(successes, trials)
    # the interval's ends are the roots in p of (p̂ − p)² = z² p (1 − p) / n
    p_hat = successes / trials
    for end in (low, high):
        if 0 < end < 1:
            assert (p_hat - end) ** 2 == pytest.approx(z * z * end * (1 - end) / trials, rel=1e-9)
    if successes == 0:
        assert low == 0 and high == pytest.approx(z * z / (trials + z * z))
    if successes == trials:
        assert high == 1 and low == pytest.approx(trials / (trials + z * z))
    assert low <= p_hat <= high


class Oracle(nn.Module):
    """Predicts ids[t + shift] at input position t of the episode it recognises."""

    def __init__(self, episodes, seq_len, shift):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.use_dnc, self.episodes, self.seq_len, self.shift = False, episodes, seq_len, shift

    def forward(self, input_ids, memory_state=None, scored=None):
        rows = []
        for inputs in input_ids:
            for ids in F.pad(self.episodes.ids, (0, self.shift)):
                for start in range(0, len(ids) - 1, self.seq_len):
                    if torch.equal(ids[start:start + len(inputs)], inputs):
                        rows.append(ids[start + self.shift:start + self.shift + len(inputs)])
        assert len(rows) == len(input_ids)
        logits = F.one_hot(torch.stack(rows), 50257).float() * 40
        return D.LMOutput(logits[scored] if scored is not None else logits)


@pytest.mark.parametrize("shift, exact", [(1, 1.0), (2, 0.0), (0, 0.0)])
def test_recall_metrics_score_the_true_next_token_and_only_it(task, shift, exact):
    cfg = D.Config(seq_len=64, batch_size=4, carry_memory=True)
    episodes = task.episodes(random.Random(7), 70, 5)
    metrics = D.recall_metrics(Oracle(episodes, 64, shift), {70: episodes}, cfg)
    assert metrics["recall"][70]["exact"] == exact and metrics["recall"][70]["queries"] == 10
    if exact:
        assert metrics["recall"][70]["answer_nll"] == pytest.approx(0, abs=1e-6)
        assert metrics["recall"][70]["low"] > 0.65


@pytest.mark.parametrize("right", [0, 1])
def test_first_query_exact_scores_each_episodes_first_query_alone(task, monkeypatch, right):
    """Every digit hit in query `right` of each episode and none in the other: exact 0.5,
    first_query_exact 1 when the first query is the right one, else 0."""
    episodes = task.episodes(random.Random(3), 70, 5)

    def scored(model, episodes, cfg):
        hit = torch.zeros(episodes.answers.shape, dtype=torch.bool)
        for row, positions in enumerate(episodes.answers):
            hit[row, positions.nonzero()[:, 0][4 * right:4 * right + 4]] = True
        gates = torch.zeros(2, len(D.TOKEN_CLASSES), dtype=torch.float64)
        return torch.ones(episodes.answers.shape, dtype=torch.float64), hit, gates
    monkeypatch.setattr(D, "score_episodes", scored)
    m = D.recall_metrics(nn.Linear(1, 1), {70: episodes}, D.Config())["recall"][70]
    assert m["exact"] == 0.5 and m["queries"] == 10
    assert m["first_query_exact"] == (1.0 if right == 0 else 0.0)


def test_fewer_queries_than_facts_asks_distinct_facts_and_keeps_the_test_size():
    task = D.RecallGenerator(D.load_tokenizer(), 64, seed=5, facts=3, queries=2)
    episodes = task.episodes(random.Random(4), 100, 6)
    fact = episodes.classes == D.TOKEN_CLASSES.index("fact code")
    asked = episodes.classes == D.TOKEN_CLASSES.index("answer")
    assert (fact.sum(1) == 12).all() and (asked.sum(1) == 8).all()
    for row in range(6):
        codes = episodes.ids[row][fact[row]].view(3, 4).tolist()
        answers = episodes.ids[row][asked[row]].view(2, 4).tolist()
        assert all(a in codes for a in answers) and answers[0] != answers[1]
    assert len(task.split("test", [64])[64].ids) == math.ceil(D.RECALL_EVAL_QUERIES["test"] / 2)


# ─── the memory on its own ────────────────────────────────────────────────────────────────

def carry_task_accuracy(detach_state, steps=200, seed=0, kernel="eager"):
    """A feed-forward controller (it holds nothing from one token to the next) with DNCMemory:
    read a value at t = 0, then 12 distractors of the same kind, then answer the value. With 4
    slots, the memory keeps the value only if it learns not to write the distractors."""
    values, gap, batch = 4, 12, 32
    torch.manual_seed(seed)
    cfg = D.Config(hidden_size=16, mem_slots=4, mem_width=8, num_reads=1, dnc_kernel=kernel)
    embed, role = nn.Embedding(values + 1, 16), nn.Embedding(3, 16)
    controller = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    memory, head = D.DNCMemory(cfg), nn.Linear(8 + 16, values)
    if detach_state:
        def detached_step(state, iface):
            read, new = D.dnc_step(state, iface)
            return read, D.DNCState(*(x.detach() if x is not None else None for x in new))
        memory.step = detached_step
    modules = nn.ModuleList([embed, role, controller, memory, head])
    optimizer = torch.optim.Adam(modules.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)

    def episode(n):
        value = torch.randint(0, values, (n,), generator=gen)
        tokens = torch.cat([value[:, None], torch.randint(0, values, (n, gap), generator=gen),
                            torch.full((n, 1), values)], 1)
        roles = torch.zeros_like(tokens)
        roles[:, 0], roles[:, -1] = 1, 2  # store, distractor, ask
        h = controller(embed(tokens) + role(roles))
        reads = memory(h)[0]
        return head(torch.cat([reads[:, -1].flatten(-2), h[:, -1]], -1)), value

    for _ in range(steps):
        logits, value = episode(batch)
        optimizer.zero_grad()
        F.cross_entropy(logits, value).backward()
        optimizer.step()
    with torch.no_grad():
        logits, value = episode(512)
    return (logits.argmax(-1) == value).float().mean().item()


@pytest.mark.parametrize("kernel", ["eager", "fused"])
def test_the_memory_alone_learns_to_carry_a_value_past_distractors(kernel):
    assert carry_task_accuracy(detach_state=False, kernel=kernel) > 0.95
    # the control: without gradients through the state it cannot learn what to keep (the
    # detaching step replaces dnc_step, which only the eager loop calls)
    assert carry_task_accuracy(detach_state=True) < 0.6


# ─── end to end ───────────────────────────────────────────────────────────────────────────

def test_recall_preset_end_to_end_writes_the_table_json_and_plot(tmp_path, capsys):
    args = ["--preset=recall", "--hidden_size=32", "--num_layers=1", "--num_heads=2",
            "--mem_slots=8", "--mem_width=8", "--max_steps=2", "--save_every_steps=2",
            "--batch_size=4", "--recall_distances=70", "--recall_test_distances=20,70",
            f"--save_dir={tmp_path}/ckpt", f"--plot_dir={tmp_path}/plots",
            f"--cache_dir={tmp_path}/cache"]
    assert D.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "plots" / "recall.json").read_text())
    assert (tmp_path / "plots" / "recall.png").stat().st_size > 0
    assert report["chance"] == 1e-4 and set(report["distances"]) == {"20", "70"}
    lines = out.split("LONG-RANGE RECALL")[1].splitlines()
    for distance, row in report["distances"].items():
        for name in D.MODEL_NAMES:
            m = row[name]
            assert m["queries"] == D.RECALL_EVAL_QUERIES["test"]
            assert m["low"] <= m["exact"] <= m["high"]
            assert m["answer_nll"] > 0
        printed = next(line.split() for line in lines if line.split()[:1] == [distance])
        assert float(printed[1]) == pytest.approx(row["GPT2 Baseline"]["exact"], abs=5e-4)
        assert float(printed[3]) == pytest.approx(row["GPT2 Baseline"]["answer_nll"], abs=5e-3)
        assert float(printed[4]) == pytest.approx(row["GPT2 + DNC"]["exact"], abs=5e-4)
        assert float(printed[6]) == pytest.approx(row["GPT2 + DNC"]["answer_nll"], abs=5e-3)
    gates = report["dnc_gate_by_class"]
    assert set(gates) == set(D.TOKEN_CLASSES) and all(0 < g < 1 for g in gates.values())
    # resuming a finished run changes nothing and refuses nothing
    assert D.main([*args, "--resume=true"]) == 0


# a valid one-step recall run: a case built on it that is not refused trains and exits 0
SMOKE_RECALL = ["--preset=smoke", "--dataset=recall", "--loss_on=answers", "--lambda_routing=0",
                "--max_steps=1"]


@pytest.mark.parametrize("args, field", [
    (["--loss_on=answers", "--lambda_routing=0"], "loss_on"),
    (["--dataset=recall", "--loss_on=answers", "--max_steps=5"], "lambda_routing"),
    (["--dataset=recall", "--max_steps=0"], "max_steps"),
    (["--loss_on=nope"], "loss_on"),
    (["--recall_test_distances=0,5"], "recall_test_distances"),
    (["--recall_queries=3"], "recall_queries"),
    (["--recall_queries=-1"], "recall_queries"),
    (["--controller_grad=-1"], "controller_grad"),
    ([*SMOKE_RECALL, "--binding_from=-1"], "binding_from"),
])
def test_bad_recall_options_exit_2_with_one_line(args, field, tmp_path, capsys):
    assert D.main([*args, f"--save_dir={tmp_path}/c", f"--plot_dir={tmp_path}/p"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--{field}" in err


def test_recall_queries_asks_that_many_of_the_steps_facts(task):
    cfg = D.Config(**{**TINY, "recall_facts": 3, "recall_queries": 2, "binding_from": 50})
    assert [D.training_queries(cfg, s) for s in (1, 49, 50, 51)] == [1, 1, 2, 2]
    every = D.Config(**{**vars(cfg), "recall_queries": 0})  # 0: every fact of the step
    assert [D.training_queries(every, s) for s in (1, 49, 50, 51)] == [1, 1, 3, 3]
    assert D.training_queries(D.Config(**TINY), 10**6) == D.Config().recall_facts
    answer = D.TOKEN_CLASSES.index("answer")
    for queries in (1, 2):
        batch = task.train_batch(7, 3, [64], queries)
        assert ((batch.classes == answer).sum(1) == 4 * queries).all()
        assert (batch.answers.sum(1) == 4 * queries).all()
    # the training loop's batches ask them
    cfg = D.Config(**{**vars(cfg), "seq_len": 64, "loss_on": "answers", "context_stride": 0})
    for step, queries in ((49, 1), (50, 2)):
        masks = D.RecallTask(cfg, task).step_batches(step)[1]
        assert sum(int(m.sum()) for m in masks) == 4 * queries * cfg.batch_size
    # the default asks the task's own number: the episodes of runs made before the option
    assert torch.equal(task.train_batch(7, 3, [64]).ids, task.train_batch(7, 3, [64], 2).ids)


def test_training_states_one_fact_before_binding_from_and_recall_facts_after_it(task):
    cfg = D.Config(**{**TINY, "recall_facts": 2, "binding_from": 50})
    assert [D.training_facts(cfg, s) for s in (1, 49, 50, 51)] == [1, 1, 2, 2]
    assert [D.training_queries(cfg, s) for s in (49, 50)] == [1, 2]  # every fact asked
    one_query = D.Config(**{**vars(cfg), "recall_queries": 1})
    assert [D.training_queries(one_query, s) for s in (49, 50)] == [1, 1]
    assert D.training_facts(D.Config(**TINY), 1) == D.Config().recall_facts
    code, name = D.TOKEN_CLASSES.index("fact code"), D.TOKEN_CLASSES.index("fact name")
    one = task.train_batch(7, 3, [64], 1, 1)
    assert ((one.classes == code).sum(1) == 4).all() and (one.answers.sum(1) == 4).all()
    assert ((one.classes == name).sum(1) > 0).all()
    assert one.answers.shape[1] == task.length(64, 1, 1)
    assert task.length(64, None, 1) < task.length(64, None, 2)  # one fact: fewer tokens
    for distance in range(64, 200, 8):  # room for the longest fact and query, no more
        room = task.fact_max + task.query_max + distance + 1
        assert task.length(distance, 1, 1) == 64 * math.ceil(room / 64)
    assert task.train_batch(7, 3, [64], None, 1).answers.sum() == 3 * 4  # asks only it
    assert "binding_from" in D.RUN_FIELDS  # a resume must not change the curriculum
    # the default states the task's own number: the episodes of runs made before the option
    assert torch.equal(task.train_batch(7, 3, [64]).ids, task.train_batch(7, 3, [64], 2, 2).ids)
    # the training loop's batches follow it: digits occur only in the codes and the answers
    digits = torch.tensor(task.digits)
    cfg = D.Config(**{**vars(cfg), "seq_len": 64, "loss_on": "answers", "context_stride": 0})
    for step, facts in ((49, 1), (50, 2)):
        segments = D.RecallTask(cfg, task).step_batches(step)[0]
        stated = sum(torch.isin(s[:, :-1], digits).sum(1) for s in segments)
        assert (stated == 8 * facts).all()  # 4 digits stated and 4 answered per fact
        episodes = task.train_batch(step, cfg.batch_size, D.unlocked_distances(cfg, step),
                                    D.training_queries(cfg, step), facts)
        assert D.input_tokens(segments) == episodes.answers.numel()  # tok_s: whole episodes


def test_curriculum_unlocks_the_distances_in_order():
    cfg = D.Config(**{**TINY, "recall_distances": "32,64,128,256", "curriculum_steps": 100})
    assert [D.unlocked_distances(cfg, s) for s in (1, 25, 26, 51, 76, 100, 500)] == [
        [32], [32], [32, 64], [32, 64, 128], [32, 64, 128, 256], [32, 64, 128, 256],
        [32, 64, 128, 256]]
    assert D.unlocked_distances(D.Config(**TINY, recall_distances="32,64"), 1) == [32, 64]


def test_context_stride_adds_every_kth_target_to_the_answers(task):
    cfg = D.Config(**{**TINY, "seq_len": 64, "batch_size": 3, "context_stride": 8,
                      "recall_distances": "64"})
    batches, masks, answers_given = D.RecallTask(cfg, task).step_batches(4)
    episodes = task.train_batch(4, 3, [64])
    answers = [m for _, m in D.episode_segments(episodes, 64)]
    for mask, answer, given in zip(masks, answers, answers_given):
        context = torch.zeros(64, dtype=torch.bool)
        context[7::8] = True
        assert torch.equal(mask, answer | context)
        assert torch.equal(given, answer)  # the answer readout's positions: the answers alone
    only = D.RecallTask(D.Config(**{**TINY, "seq_len": 64, "batch_size": 3,
                                    "recall_distances": "64"}), task).step_batches(4)[1]
    assert all(torch.equal(m, a) for m, a in zip(only, answers))
