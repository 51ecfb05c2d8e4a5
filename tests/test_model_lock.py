"""Long jobs give the shared model back between steps: another thread (a Compare) gets the lock within about one
step, not after the whole job; and an adapter in training is never visible to it."""
import threading
import time

import pytest
import torch

from ragdemo.engine.lora import private_lm, trainable_lora
from ragdemo.models.lock import ModelLock
from ragdemo.models.packed import is_linear

STEP_S = 0.3


def wait_for(condition, timeout=30.0):
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "the job never reached the awaited step"
        time.sleep(0.01)


class SlowSteps:
    """A progress callback that makes every step of a job last STEP_S (with the model held, as real work does)
    and records what the job reported."""

    def __init__(self):
        self.messages: list[str] = []

    def __call__(self, fraction, message):
        self.messages.append(message)
        time.sleep(STEP_S)


def time_to_get_in(lock, running: threading.Thread) -> tuple[float, bool]:
    """Seconds another thread waits for the model, and whether the job was still running when it got in."""
    started = time.perf_counter()
    with lock:
        waited = time.perf_counter() - started
        still_running = running.is_alive()
    return waited, still_running


def test_a_waiting_thread_gets_the_model_between_two_steps():
    lock, steps_done = ModelLock(), []

    def job():
        with lock.per_step() as step:
            for i in range(20):
                time.sleep(0.05)  # the work of one step, with the model held
                steps_done.append(i)
                step(i / 20, "step")
        job.handed_s = step.handed_s

    worker = threading.Thread(target=job)
    worker.start()
    wait_for(lambda: len(steps_done) >= 2)
    waited, still_running = time_to_get_in(lock, worker)
    worker.join()
    assert still_running and waited < 0.05 * 20 / 2  # well under the job's second
    assert len(steps_done) == 20 and job.handed_s > 0


def test_nobody_waiting_costs_nothing():
    lock = ModelLock()
    with lock.per_step() as step:
        for i in range(200):
            step(i / 200, "step")
    assert step.handed_s == 0.0 and not lock.locked()


def test_a_cancel_inside_a_step_releases_the_model():
    lock = ModelLock()

    def cancel(fraction, message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with lock.per_step(cancel) as step:
            step(0.1, "first step")
    assert not lock.locked()


def test_prepare_hands_the_model_over_per_batch(tiny_bench, docs_dir, monkeypatch):
    from ragdemo.engine import prepare_pass

    monkeypatch.setattr(prepare_pass, "BATCH_TOKENS", 120)  # the tiny collection in several batches
    tiny_bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())])
    lm, slow = tiny_bench.models.lm, SlowSteps()
    worker = threading.Thread(target=lambda: tiny_bench.prepare(["lloco", "cacheblend"], progress=slow))
    started = time.perf_counter()
    worker.start()
    wait_for(lambda: any("tokens/s" in m for m in slow.messages))
    waited, still_running = time_to_get_in(lm.lock, worker)
    worker.join()
    whole_job = time.perf_counter() - started
    batches = sum(m.startswith("forward pass:") and "tokens/s" in m for m in slow.messages)
    assert batches >= 3 and still_running, "the Compare got the model only after the whole prepare"
    assert waited < 3 * STEP_S and waited < whole_job / 3
    assert all(line.endswith("stored)") for line in tiny_bench.prepare(["lloco", "cacheblend"]))  # nothing left half-done


def test_finetune_trains_on_a_private_copy_and_hands_the_model_over(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())])
    lm, slow = tiny_bench.models.lm, SlowSteps()
    ids = torch.tensor([lm.tokenizer("The tower was completed in 1889.")["input_ids"]])
    with torch.inference_mode():
        before = lm.model(input_ids=ids).logits
    knobs = {"lloco": {"lora_steps": 12, "lora_lr": 1e-2}}
    worker = threading.Thread(target=lambda: tiny_bench.finetune("lloco", knobs=knobs, progress=slow))
    worker.start()
    wait_for(lambda: any("LoRA step 2/" in m for m in slow.messages))
    started = time.perf_counter()
    with lm.lock:  # what a Compare sees between two training steps: the base model, bit for bit
        waited = time.perf_counter() - started
        still_training = worker.is_alive()
        plain = all(is_linear(layer.self_attn.q_proj) for layer in lm.model.model.layers)
        training_mode = lm.model.training
        with torch.inference_mode():
            between = lm.model(input_ids=ids).logits
    worker.join()
    assert still_training and waited < 3 * STEP_S, "the Compare waited for the whole fine-tuning"
    assert plain and not training_mode and torch.equal(between, before)
    assert any("LoRA step 12/12" in m for m in slow.messages)


def test_private_copy_shares_weights_and_keeps_adapters_out_of_the_shared_model(tiny_lm):
    grads = {n: p.requires_grad for n, p in tiny_lm.model.named_parameters()}
    student = private_lm(tiny_lm)
    shared = dict(tiny_lm.model.named_parameters())
    for name, weight in student.model.named_parameters():
        assert weight.data_ptr() == shared[name].data_ptr()  # no weight copied
    assert student.model.lm_head.weight is student.model.model.embed_tokens.weight  # tying kept
    with trainable_lora(student, r=4, alpha=8) as peft_model:
        assert any(p.requires_grad for p in peft_model.parameters())
        assert all(is_linear(layer.self_attn.q_proj) for layer in tiny_lm.model.model.layers)
        assert {n: p.requires_grad for n, p in tiny_lm.model.named_parameters()} == grads
        assert not tiny_lm.model.training
