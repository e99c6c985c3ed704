"""The RL loop's held-out evaluation prompts never come from the training rows of a file task."""
from ring_jax.data import tasks
from ring_jax.data.tokenizer import get_tokenizer
from ring_jax.train import experiment, rl_loop


def _quickstart_config(experiment_file, **task):
    c = experiment_file("quickstart").get_config("smoke").to_dict()
    c["task"].update(task)
    # The bundled math prompts (up to ~140 byte tokens) do not fit the smoke config's rows.
    c["scheduler"]["max_seq_len"] = c["engine"]["max_len"] = c["sft"]["seq_len"] = 256
    return experiment.from_config_dict(c)


def test_eval_records_are_held_out_rows_of_a_file_task(experiment_file):
    cfg = _quickstart_config(experiment_file, name="math", kwargs={"eval_fraction": 0.25})
    task = tasks.get(cfg.task.name, **dict(cfg.task.kwargs))
    records = rl_loop._eval_records(cfg, task, get_tokenizer(cfg.task.tokenizer))
    train_prompts = {task.sample(i, 0).prompt for i in range(task.num_examples)}
    held_out = {task.held_out().sample(i, 0).prompt for i in range(task.held_out().num_examples)}
    assert len(records) == cfg.eval.num_prompts
    assert {r["prompt_text"] for r in records} <= held_out
    assert held_out.isdisjoint(train_prompts)


def test_eval_set_is_the_same_for_every_run_seed_and_disjoint_from_training(experiment_file):
    smoke = experiment_file("quickstart").get_config("smoke").to_dict()
    cfg_a = experiment.from_config_dict(smoke)
    cfg_b = experiment.from_config_dict({**smoke, "seed": 1})
    task = tasks.get(cfg_a.task.name, **dict(cfg_a.task.kwargs))
    tokenizer = get_tokenizer(cfg_a.task.tokenizer)
    records_a = rl_loop._eval_records(cfg_a, task, tokenizer)
    records_b = rl_loop._eval_records(cfg_b, task, tokenizer)
    assert [r["prompt_text"] for r in records_a] == [r["prompt_text"] for r in records_b]
    training = {task.sample(i, s).prompt for s in (0, 1) for i in range(2000)}
    assert training.isdisjoint(r["prompt_text"] for r in records_a)
