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
    return D.RecallTask(D.load_tokenizer(), 64, seed=5)


# ─── episodes ─────────────────────────────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def aligned_task():
    return D.RecallTask(D.load_tokenizer(), 64, seed=5, query_opens_segment=True)


@pytest.fixture(scope="module")
def shifted_task():
    return D.RecallTask(D.load_tokenizer(), 64, seed=5, shift=True)


@pytest.mark.parametrize("distance", [16, 100, 256])
@pytest.mark.parametrize("layout", ["plain", "aligned", "shifted"])
def test_episode_states_two_facts_then_asks_for_them_after_exactly_the_distance(
        task, aligned_task, shifted_task, distance, layout):
    task = {"plain": task, "aligned": aligned_task, "shifted": shifted_task}[layout]
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


@pytest.mark.parametrize("distance", [1, 8, 50, 64, 130])
def test_query_opens_a_segment_so_that_only_the_memory_links_it_to_the_facts(aligned_task,
                                                                             distance):
    episodes = aligned_task.episodes(random.Random(distance), distance, 8)
    query, filler = D.TOKEN_CLASSES.index("query"), D.TOKEN_CLASSES.index("filler")
    fact_classes = [D.TOKEN_CLASSES.index(k) for k in ("fact name", "fact code", "fact frame")]
    for kinds in episodes.classes.tolist():
        first_query = kinds.index(query)
        assert first_query % 64 == 0 and first_query > 0
        assert not any(k in fact_classes for k in kinds[first_query:])
        last_answer_close = max(j for j, k in enumerate(kinds) if k == query)
        assert kinds[last_answer_close + 1:] and all(
            k == filler for k in kinds[last_answer_close + 1:])
    # the default layout ends each episode with its queries
    plain = D.RecallTask(D.load_tokenizer(), 64, seed=5).episodes(random.Random(0), distance, 4)
    assert (plain.classes[:, -1] == query).all()


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


def test_shift_curriculum_keeps_the_fixed_layout_before_the_step_and_shifts_from_it(task,
                                                                                    shifted_task):
    cfg = D.Config(**{**TINY, "seq_len": 64, "recall_distances": "64", "recall_shift": True,
                      "recall_shift_from": 3})
    for step, layout in ((1, task), (2, task), (3, shifted_task), (4, shifted_task)):
        batches, _ = D.step_batches(shifted_task, cfg, step, None)
        expected = layout.train_batch(step, cfg.batch_size, [64])
        assert torch.equal(torch.cat([b[:, :-1] for b in batches], 1), expected.ids[:, :-1])
    # the run's task, from which validation and test are drawn, is shifted at every step
    run_task = D.recall_task(D.Config(**{**vars(cfg), "seed": 5}), D.load_tokenizer())
    assert torch.equal(run_task.split("valid", [64])[64].ids,
                       shifted_task.split("valid", [64])[64].ids)


def test_the_recall_preset_turns_its_shift_off_by_the_flags_its_error_names(capsys):
    # the preset shifts from step 1,501; turning the shift off alone is refused, and the line
    # names the pair of flags that gives the fixed layout of every run before P8
    fixed = ["--recall_shift=false", "--recall_shift_from=0"]
    with pytest.raises(D.ConfigError, match=" ".join(fixed)):
        D.validate_config(D.config_from_args(["--preset=recall", fixed[0]]))
    cfg = D.config_from_args(["--preset=recall", *fixed])
    D.validate_config(cfg)
    assert not any(D.training_shift(cfg, step) for step in (0, 1501, cfg.max_steps))
    preset = D.config_from_args(["--preset=recall"])
    assert [D.training_shift(preset, step) for step in (1500, 1501)] == [False, True]


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
        loss, parts = D.compute_loss(part, ids[:, 1:][mask], cfg)
    assert part.logits.shape == (3, 97)
    by_hand = [-torch.log_softmax(full[r, t], -1)[ids[r, t + 1]] for r, t in ((0, 2), (0, 5),
                                                                               (1, 7))]
    assert parts["lm"] == pytest.approx(float(sum(by_hand) / 3), rel=1e-5)


def test_train_step_weights_segments_by_their_scored_targets():
    cfg = D.Config(**{**TINY, "grad_clip": 1e9})
    model = D.build_model(cfg, True)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 97, (2, 9), generator=gen) for _ in range(3)]
    batches[1][:, 0], batches[2][:, 0] = batches[0][:, -1], batches[1][:, -1]
    masks = [torch.zeros(2, 8, dtype=torch.bool) for _ in range(3)]
    masks[1][0, 3] = True
    masks[2][:, 4:7] = True
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
                              batches, cfg, D.StopFlag(), torch.device("cpu"), scored=masks)
    assert sums["tokens"] == 7
    assert sums["lm"] / sums["tokens"] == pytest.approx(nll.mean().item(), rel=1e-5)
    torch.testing.assert_close(before - model.read_proj.weight.detach(), expected_grad,
                               rtol=1e-4, atol=1e-7)


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
                 torch.amp.GradScaler("cpu", enabled=False), batches, cfg, D.StopFlag(),
                 torch.device("cpu"), scored=masks)
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
    _, _, state = D.train_step(model, model, *args, batches[:1], cfg, D.StopFlag(),
                               torch.device("cpu"), scored=masks[:1])
    before = calls[0].write_vector.grad.clone()
    D.train_step(model, model, *args, batches[1:], cfg, D.StopFlag(), torch.device("cpu"),
                 state=state, scored=masks[1:])
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
    task = D.RecallTask(D.load_tokenizer(), 64, seed=5, facts=3, queries=2)
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
    (["--recall_queries_from=100"], "recall_queries_from"),
    (["--recall_queries=1", "--recall_queries_from=-1"], "recall_queries_from"),
    (["--controller_grad=-1"], "controller_grad"),
    (["--recall_facts_from=-1"], "recall_facts_from"),
    ([*SMOKE_RECALL, "--recall_shift=true", "--recall_shift_from=-1"], "recall_shift_from"),
    ([*SMOKE_RECALL, "--recall_shift_from=100"], "recall_shift_from"),
    ([*SMOKE_RECALL, "--recall_shift=true", "--query_opens_segment=true"], "recall_shift"),
])
def test_bad_recall_options_exit_2_with_one_line(args, field, tmp_path, capsys):
    assert D.main([*args, f"--save_dir={tmp_path}/c", f"--plot_dir={tmp_path}/p"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--{field}" in err


def test_query_curriculum_asks_every_fact_before_the_step_and_fewer_from_it(task):
    cfg = D.Config(**{**TINY, "recall_facts": 2, "recall_queries": 1, "recall_queries_from": 50})
    assert [D.training_queries(cfg, s) for s in (1, 49, 50, 51)] == [2, 2, 1, 1]
    assert D.training_queries(D.Config(**{**TINY, "recall_queries": 1}), 1) == 1
    assert D.training_queries(D.Config(**TINY), 10**6) == D.Config().recall_facts
    answer = D.TOKEN_CLASSES.index("answer")
    for queries in (1, 2):
        batch = task.train_batch(7, 3, [64], queries)
        assert ((batch.classes == answer).sum(1) == 4 * queries).all()
        assert (batch.answers.sum(1) == 4 * queries).all()
    # the training loop's batches follow the curriculum
    cfg = D.Config(**{**vars(cfg), "seq_len": 64, "loss_on": "answers", "context_stride": 0})
    for step, queries in ((49, 2), (50, 1)):
        masks = D.step_batches(task, cfg, step, None)[1]
        assert sum(int(m.sum()) for m in masks) == 4 * queries * cfg.batch_size
    # the default asks the task's own number: the episodes of runs made before the option
    assert torch.equal(task.train_batch(7, 3, [64]).ids, task.train_batch(7, 3, [64], 2).ids)


def test_facts_curriculum_states_one_fact_before_the_step_and_recall_facts_from_it(task):
    cfg = D.Config(**{**TINY, "recall_facts": 2, "recall_facts_from": 50})
    assert [D.training_facts(cfg, s) for s in (1, 49, 50, 51)] == [1, 1, 2, 2]
    assert [D.training_queries(cfg, s) for s in (49, 50)] == [1, 2]  # every fact asked
    one_query = D.Config(**{**vars(cfg), "recall_queries": 1, "recall_queries_from": 1})
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
    assert "recall_facts_from" in D.RUN_FIELDS  # a resume must not change the curriculum
    # the default states the task's own number: the episodes of runs made before the option
    assert torch.equal(task.train_batch(7, 3, [64]).ids, task.train_batch(7, 3, [64], 2, 2).ids)
    # the training loop's batches follow it: digits occur only in the codes and the answers
    digits = torch.tensor(task.digits)
    cfg = D.Config(**{**vars(cfg), "seq_len": 64, "loss_on": "answers", "context_stride": 0})
    for step, facts in ((49, 1), (50, 2)):
        segments = D.step_batches(task, cfg, step, None)[0]
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
    batches, masks = D.step_batches(task, cfg, 4, 10)
    episodes = task.train_batch(4, 3, [64])
    answers = [m for _, m in D.episode_segments(episodes, 64)]
    for mask, answer in zip(masks, answers):
        context = torch.zeros(64, dtype=torch.bool)
        context[7::8] = True
        assert torch.equal(mask, answer | context)
    only = D.step_batches(task, D.Config(**{**TINY, "seq_len": 64, "batch_size": 3,
                                            "recall_distances": "64"}), 4, 10)[1]
    assert all(torch.equal(m, a) for m, a in zip(only, answers))


# ─── the diagnostic ladder (tests/recall_ladder.py) ───────────────────────────────────────

def ladder_module(name="recall_ladder"):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LADDER = dict(TINY, vocab_size=50257, seq_len=64, batch_size=4, recall_facts=1,
              recall_distances="64")


@pytest.fixture(scope="module")
def one_fact():
    return D.RecallTask(D.load_tokenizer(), 64, seed=5, facts=1)


@pytest.mark.parametrize("mode,open_classes", [("oracle_gate", {"fact code"}),
                                                ("oracle_digits", {"fact code", "answer"})])
@pytest.mark.parametrize("memory_layer", [0, 1])
def test_oracle_gates_write_the_digits_they_name_and_nothing_else(one_fact, memory_layer, mode,
                                                                  open_classes):
    task = one_fact
    cfg = D.Config(**{**LADDER, "num_layers": 2, "memory_layer": memory_layer})
    model = D.build_model(cfg, True)
    oracle = ladder_module().Oracle(mode, model, cfg, task.digits)
    episodes = task.episodes(random.Random(3), 64, 4)
    oracle.start(episodes)
    gates = D.recall_metrics(model, {64: episodes}, cfg)["gate_by_class"]
    assert set(gates) == set(D.TOKEN_CLASSES)
    assert {k for k, g in gates.items() if g == 1.0} == open_classes
    assert all(gates[k] == 0.0 for k in set(gates) - open_classes)


def test_oracle_answer_reads_the_target_digit_and_oracle_bag_every_stated_digit(one_fact):
    task = one_fact
    ladder = ladder_module()
    cfg = D.Config(**LADDER)
    episodes = task.episodes(random.Random(4), 64, 4)
    width = cfg.num_reads * cfg.mem_width
    answer = ladder.oracle_reads("oracle_answer", episodes, task.digits, width)
    bag = ladder.oracle_reads("oracle_bag", episodes, task.digits, width)
    targets = episodes.ids[:, 1:][episodes.answers]
    digit_of = {token: value for value, token in enumerate(task.digits)}
    assert torch.equal(answer[episodes.answers][:, :10].argmax(-1),
                       torch.tensor([digit_of[t] for t in targets.tolist()]))
    assert answer.sum() == episodes.answers.sum() and answer[:, :, 10:].abs().sum() == 0
    assert torch.equal(bag[:, -1, :10].sum(-1), torch.full((4,), 4.0))  # one 4-digit fact each
    first_digit = (episodes.classes == D.TOKEN_CLASSES.index("fact code")).int().argmax(1)
    assert all(bag[row, :first_digit[row]].abs().sum() == 0 for row in range(4))
    # a read_proj that maps read dimension d onto digit d's embedding: the perfect lookup
    # then answers every code exactly, and the same model without the oracle does not
    model = D.build_model(cfg, True)
    with torch.no_grad():
        model.read_proj.weight.zero_()
        for value, token in enumerate(task.digits):
            model.read_proj.weight[:, value] = 1e3 * model.lm_head.weight[token]
    assert D.recall_metrics(model, {64: episodes}, cfg)["exact"] < 0.5
    oracle = ladder.Oracle("oracle_answer", model, cfg, task.digits)
    oracle.start(episodes)
    assert D.recall_metrics(model, {64: episodes}, cfg)["exact"] == 1.0


def test_ladder_probe_over_batches_equals_the_metrics_of_all_episodes_at_once(task,
                                                                               monkeypatch):
    ladder = ladder_module()
    cfg = D.Config(**{**LADDER, "recall_facts": 2, "batch_size": 2})
    episodes = task.episodes(random.Random(9), 64, 7)  # four batches, the last one short

    def scored(model, part, cfg):  # each query right iff its first digit is even
        hit = torch.zeros(part.answers.shape, dtype=torch.bool)
        nll = torch.zeros(part.answers.shape, dtype=torch.float64)
        for row, positions in enumerate(part.answers):
            at = positions.nonzero()[:, 0]
            nll[row, at] = torch.arange(len(at), dtype=torch.float64)
            for query in at.view(-1, 4):
                hit[row, query] = part.ids[row, query[0] + 1] in task.digits[::2]
        return nll, hit, torch.zeros(2, len(D.TOKEN_CLASSES), dtype=torch.float64)
    monkeypatch.setattr(D, "score_episodes", scored)
    model = D.build_model(cfg, True)
    whole = D.recall_metrics(model, {64: episodes}, cfg)
    assert 0 < whole["recall"][64]["first_query_exact"] < 1
    nll, exact, first, _ = ladder.probe(model, ladder.Oracle("memory", model, cfg, task.digits),
                                        episodes, cfg)
    assert nll == pytest.approx(whole["loss"], rel=1e-9) and exact == whole["exact"]
    assert first == pytest.approx(whole["recall"][64]["first_query_exact"], abs=1e-6)


def test_binding_probe_finds_each_querys_other_code_and_scrambles_the_first_answer(task):
    probe = ladder_module("recall_binding_probe")
    cfg = D.Config(**{**LADDER, "recall_facts": 2})
    episodes = task.episodes(random.Random(11), 64, 6)
    value = torch.zeros(cfg.vocab_size, dtype=torch.long)
    value[task.digits] = torch.arange(10)
    model = D.build_model(cfg, True).eval()
    exact, probs, asked, other = probe.exact_by_query(model, episodes, cfg, task, value)
    assert probs.shape == (6, 2, 4, 10) and exact.shape == (2,)
    for row in range(6):  # by hand: the two facts' codes, in the order stated, and the answers
        kinds = episodes.classes[row]
        codes = value[episodes.ids[row][kinds == D.TOKEN_CLASSES.index("fact code")]]
        answers = value[episodes.ids[row][kinds == D.TOKEN_CLASSES.index("answer")]]
        codes, answers = codes.view(2, 4).tolist(), answers.view(2, 4).tolist()
        assert asked[row].tolist() == answers
        assert other[row].tolist() == [codes[1 - codes.index(a)] for a in answers]
    scrambled = probe.without_first_answer(episodes, task.digits, torch.Generator().manual_seed(0))
    changed = (scrambled.ids != episodes.ids).nonzero()
    first = (episodes.classes == D.TOKEN_CLASSES.index("answer")).int().cumsum(1) <= 4
    first &= episodes.classes == D.TOKEN_CLASSES.index("answer")
    assert changed.tolist() and all(first[r, c] for r, c in changed.tolist())
    assert torch.isin(scrambled.ids[first], torch.tensor(task.digits)).all()


def test_fact_read_mass_splits_each_answer_read_by_the_fact_whose_code_wrote_the_slot():
    probe = ladder_module("recall_binding_probe")
    gen = torch.Generator().manual_seed(3)
    writes = torch.rand(12, 6, generator=gen) * 0.01
    writes[1:5, 0] += 0.3  # fact 0 owns slots 0 and 1, fact 1 owns slots 1 and 3
    writes[1:5, 1] += 0.1
    writes[6:10, 1] += 0.1
    writes[6:10, 3] += 0.25
    writes[6:10, 5] += 0.05  # 0.2 in all: under the threshold, nobody's
    reads = torch.softmax(torch.randn(12, 2, 6, generator=gen), -1)
    mass = probe.fact_read_mass(writes, reads, torch.tensor([[1, 2, 3, 4], [6, 7, 8, 9]]),
                                torch.tensor([10, 11]), torch.tensor([0, 1]))
    r10, r11 = reads[10].mean(0), reads[11].mean(0)
    expected = [[r10[0] + r10[1], r10[3], r10[2] + r10[4] + r10[5]],
                [r11[1] + r11[3], r11[0], r11[2] + r11[4] + r11[5]]]
    assert torch.allclose(mass, torch.tensor(expected), atol=1e-6)


def test_dnc_trace_records_the_write_weights_the_model_itself_computes(task):
    probe = ladder_module("recall_binding_probe")
    cfg = D.Config(**{**LADDER, "recall_facts": 2, "num_layers": 2, "memory_layer": 1})
    episodes = task.episodes(random.Random(11), 64, 6)  # 6 rows: batches of 4 and of 2
    model = D.build_model(cfg, True).eval()
    writes, reads = probe.dnc_trace(model, episodes, cfg)
    n, length = episodes.answers.shape
    assert writes.shape == (n, length, cfg.mem_slots)
    assert reads.shape == (n, length, cfg.num_reads, cfg.mem_slots)
    assert torch.allclose(reads.sum(-1), torch.ones(n, length, cfg.num_reads), atol=1e-5)
    assert model.memory.step is D.dnc_step and model.memory.kernel == cfg.dnc_kernel
    model.memory.kernel = "eager"  # the fused scan may take another of two equally free slots
    with torch.no_grad():  # the model's own run in one batch, without the recording
        state, own = None, []
        for ids, mask in D.episode_segments(episodes, cfg.seq_len):
            out = model(ids[:, :-1], scored=mask, memory_state=state)
            state = out.memory_state
            own.append(out.write_weights)
    assert torch.allclose(writes, torch.cat(own, 1), atol=1e-5)


def test_exact_by_shared_name_word_groups_episodes_by_the_names_in_their_text(task, capsys):
    import re
    probe = ladder_module("recall_binding_probe")
    tokenizer = D.load_tokenizer()
    pairs = {("Ada Turing", "Ada Knuth"): "first", ("Grace Hopper", "Alan Hopper"): "last",
             ("Ada Turing", "Grace Hopper"): "neither"}
    for (a, b), shared in pairs.items():
        assert probe.shared_name_word(tokenizer, [tokenizer.encode(f" {a}"),
                                                  tokenizer.encode(f" {b}")]) == shared
    episodes = task.episodes(random.Random(4), 64, 300)  # 300 rows: every group occurs
    hits = torch.rand(300, generator=torch.Generator().manual_seed(2)) < 0.6
    probe.print_exact_by_shared_word(episodes, hits, tokenizer)
    groups = {"neither": [], "first": [], "last": []}
    for row in range(300):  # independently: the names as the episode's text states them
        text = tokenizer.decode(episodes.ids[row].tolist())
        (a1, a2), (b1, b2) = re.findall(r"The code of (\w+) (\w+) is", text)
        groups["first" if a1 == b1 else "last" if a2 == b2 else "neither"].append(bool(hits[row]))
    assert all(groups.values())
    expected = ", ".join(f"{k} {sum(v) / len(v):.3f} ({len(v)} episodes)" for k, v in groups.items())
    assert capsys.readouterr().out.strip().endswith(expected)


def test_exact_by_fact_order_splits_by_the_position_of_the_asked_fact_in_the_text(task, capsys):
    import re
    probe = ladder_module("recall_binding_probe")
    tokenizer = D.load_tokenizer()
    episodes = task.episodes(random.Random(6), 64, 200)
    value = torch.zeros(D.Config().vocab_size, dtype=torch.long)
    value[task.digits] = torch.arange(10)
    hits = torch.rand(200, generator=torch.Generator().manual_seed(5)) < 0.5
    asked = value[probe.codes_of(episodes, "answer")][:, 0]
    probe.print_exact_by_fact_order(value[probe.codes_of(episodes, "fact code")], asked, hits)
    groups = ([], [])
    for row in range(200):  # independently: the names as the text states and asks them
        text = tokenizer.decode(episodes.ids[row].tolist())
        stated = re.findall(r"The code of (\w+ \w+) is", text)
        groups[stated.index(re.search(r"What is the code of (\w+ \w+) \?", text)[1])].append(
            bool(hits[row]))
    assert all(groups)
    expected = (f"stated first {sum(groups[0]) / len(groups[0]):.3f} ({len(groups[0])} "
                f"episodes), second {sum(groups[1]) / len(groups[1]):.3f} ({len(groups[1])} "
                f"episodes)")
    assert capsys.readouterr().out.strip().endswith(expected)


def test_oracle_e17_fixes_the_gate_at_the_listed_value_of_each_token_class(one_fact):
    ladder = ladder_module()
    cfg = D.Config(**{**LADDER, "num_layers": 2, "memory_layer": 1})
    model = D.build_model(cfg, True)
    oracle = ladder.Oracle("oracle_e17", model, cfg, one_fact.digits)
    oracle.start(one_fact.episodes(random.Random(5), 64, 4))
    gates = D.recall_metrics(model, {64: one_fact.episodes(random.Random(5), 64, 4)},
                             cfg)["gate_by_class"]
    assert gates == pytest.approx(ladder.E17_GATES, abs=1e-6)


def test_oracle_contrast_writes_high_at_the_fact_code_and_low_everywhere_else(one_fact):
    ladder = ladder_module()
    cfg = D.Config(**{**LADDER, "num_layers": 2, "memory_layer": 1})
    model = D.build_model(cfg, True)
    oracle = ladder.Oracle("oracle_contrast", model, cfg, one_fact.digits, (0.2, 0.7))
    oracle.start(one_fact.episodes(random.Random(5), 64, 4))
    gates = D.recall_metrics(model, {64: one_fact.episodes(random.Random(5), 64, 4)},
                             cfg)["gate_by_class"]
    assert gates == pytest.approx({k: 0.7 if k == "fact code" else 0.2 for k in gates},
                                  abs=1e-6)


def test_gate_speed_keeps_the_start_and_moves_the_gate_k_times_as_far_per_adam_step():
    ladder = ladder_module()
    cfg = D.Config(**{**LADDER, "num_layers": 2, "memory_layer": 1})
    h = torch.randn(3, 5, cfg.hidden_size)
    logits = []
    for k in (1.0, 7.0):
        torch.manual_seed(0)
        memory = D.build_model(cfg, True).memory
        before = memory.interface(h).write_gate
        ladder.speed_up_gate(type("Model", (), {"memory": memory})(), k)
        start = memory.interface(h).write_gate
        assert torch.allclose(start, before, atol=1e-5)
        optimizer = torch.optim.Adam(memory.parameters(), lr=1e-3)
        memory.interface(h).write_gate.mean().backward()
        optimizer.step()
        logits.append(torch.logit(memory.interface(h).write_gate) - torch.logit(start))
    assert torch.allclose(logits[1], 7.0 * logits[0], rtol=1e-3, atol=1e-6)


def test_reinit_restores_the_named_parts_to_their_initial_values_and_keeps_the_rest():
    ladder = ladder_module()
    cfg = D.Config(**{**LADDER, "num_layers": 2, "memory_layer": 1})
    model = D.build_model(cfg, True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.1)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    ladder.reinitialise(model, cfg, ["read_proj", "interface"])
    fresh = D.build_model(cfg, True).state_dict()
    for name, value in model.state_dict().items():
        restored = name.startswith(("read_proj.", "memory.interface_proj."))
        assert torch.equal(value, fresh[name] if restored else trained[name]), name


@pytest.mark.parametrize("trained", [True, False])
def test_saved_model_loads_what_the_ladder_saved_or_its_initial_values(tmp_path, trained):
    import dataclasses

    ladder = ladder_module()
    cfg = D.Config(**{**LADDER, "num_layers": 2, "memory_layer": 1, "tie_embeddings": False})
    model = D.build_model(cfg, True)
    with torch.no_grad():
        model.read_proj.weight.add_(1.0)
    torch.save({"config": dataclasses.asdict(cfg), "model_state_dict": model.state_dict()},
               tmp_path / "ladder-memory-7.pt")
    loaded_cfg, loaded, task, episodes = ladder.saved_model(tmp_path / "ladder-memory-7.pt", 3,
                                                            trained)
    assert loaded_cfg == cfg and not loaded.training and len(episodes.ids) == 3
    expected = model if trained else D.build_model(cfg, True)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected.state_dict()[name]), name
    assert torch.equal(episodes.ids, ladder.ladder_episodes(task, cfg, 3).ids)
