import re

import pytest
import torch

from small_params import cpu
from vqprior.config import TrainParams
from vqprior.runtime import resolve_runtime
from vqprior.errors import TrainingError
from vqprior.training import TrainingDiverged, fit, lr_factor

CPU = resolve_runtime(cpu())


class MLP(torch.nn.Sequential):
    def hidden_matrices(self):  # what train.optimizer muon orthogonalises
        return [self[0].weight]


def make_problem(seed=0):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))  # the data never changes
    torch.manual_seed(seed)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    model = MLP(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))

    def step(idx):
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        return loss, {"loss": loss.detach()}

    def evaluate():
        return {"loss": torch.nn.functional.mse_loss(model(x), y).item()}

    return model, step, evaluate


P = TrainParams(epochs=4, batch_size=16, lr=0.01, weight_decay=0.0, warmup_steps=2, grad_clip=1.0, patience=10)


def test_loss_falls_and_best_weights_are_kept(tmp_path):
    model, step, evaluate = make_problem()
    before = evaluate()["loss"]
    result = fit(model, 64, step, evaluate, P, CPU, seed=1, checkpoint=tmp_path / "c.pt", monitor="loss")
    assert result.epochs == 4 and len(result.history) == 4
    assert result.best["val_loss"] < before
    assert evaluate()["loss"] == pytest.approx(result.best["val_loss"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_interruption_gives_identical_weights(tmp_path, optimizer):
    model, step, evaluate = make_problem()
    fit(model, 64, step, evaluate, P, CPU, seed=1, checkpoint=tmp_path / "full.pt", monitor="loss", optimizer=optimizer)
    full = {k: v.clone() for k, v in model.state_dict().items()}

    class Killed(Exception):
        pass

    def kill_after_two(epoch, metrics):
        if epoch == 2:
            raise Killed

    model, step, evaluate = make_problem()
    with pytest.raises(Killed):
        fit(model, 64, step, evaluate, P, CPU, seed=1, checkpoint=tmp_path / "part.pt", monitor="loss", on_epoch=kill_after_two,
            optimizer=optimizer)
    # epoch 2's checkpoint is written after on_epoch, so the run resumes after epoch 1
    model, step, evaluate = make_problem(seed=99)  # fresh process: different init, same checkpoint
    result = fit(model, 64, step, evaluate, P, CPU, seed=1, checkpoint=tmp_path / "part.pt", monitor="loss",
                 optimizer=optimizer)
    assert result.epochs == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_checkpoint_from_other_params_is_not_resumed(tmp_path, capsys):
    model, step, evaluate = make_problem()
    ckpt = tmp_path / "c.pt"
    short = P.model_copy(update={"epochs": 2})
    fit(model, 64, step, evaluate, short, CPU, seed=1, checkpoint=ckpt, monitor="loss", fingerprint="lr=0.01")
    model, step, evaluate = make_problem()
    epochs_run = []
    result = fit(model, 64, step, evaluate, P, CPU, seed=1, checkpoint=ckpt, monitor="loss", fingerprint="lr=0.02",
                 on_epoch=lambda epoch, metrics: epochs_run.append(epoch))
    out = capsys.readouterr().out
    assert "ignoring" in out and "resuming" not in out
    assert epochs_run == [1, 2, 3, 4] and len(result.history) == 4  # started afresh, not from epoch 2


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    model, step, evaluate = make_problem()
    calls = {"n": 0}

    def poisoned(idx):
        calls["n"] += 1
        loss, stats = step(idx)
        return (loss * float("nan"), stats) if calls["n"] > 6 else (loss, stats)

    ckpt = tmp_path / "c.pt"
    after_epoch_1 = {}

    def snapshot(epoch, metrics):
        if epoch == 1:
            after_epoch_1.update({k: v.clone() for k, v in model.state_dict().items()})

    with pytest.raises(TrainingDiverged) as info:  # 4 steps per epoch: the 7th step, in epoch 2, is NaN
        fit(model, 64, poisoned, evaluate, P, CPU, seed=1, checkpoint=ckpt, monitor="loss", on_epoch=snapshot)
    assert "loss is nan" in str(info.value) and str(ckpt) in str(info.value)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 1  # the good epoch survives, with its weights, not the NaN step's
    for k, v in saved["model"].items():
        assert torch.isfinite(v).all() and torch.equal(v, after_epoch_1[k]), k
    model, step, evaluate = make_problem()  # and a healthy re-run resumes from it
    result = fit(model, 64, step, evaluate, P, CPU, seed=1, checkpoint=ckpt, monitor="loss")
    assert result.epochs == 4 and result.history[0] == saved["history"][0]


def test_nan_validation_metric_stops_instead_of_becoming_the_best(tmp_path):
    model, step, _ = make_problem()
    val_losses = iter([0.5, float("nan")])
    with pytest.raises(TrainingDiverged, match=r"validation loss is nan after epoch 2"):
        fit(model, 64, step, lambda: {"loss": next(val_losses)}, P, CPU, seed=1, checkpoint=tmp_path / "c.pt", monitor="loss")
    assert torch.load(tmp_path / "c.pt", weights_only=False)["epoch"] == 1


def test_unreadable_checkpoint_stops_with_one_line(tmp_path):
    model, step, evaluate = make_problem()
    (tmp_path / "c.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(TrainingError) as info:
        fit(model, 64, step, evaluate, P, CPU, seed=1, checkpoint=tmp_path / "c.pt", monitor="loss", desc="train_x")
    assert str(info.value) == (f"train_x: {tmp_path / 'c.pt'} is not a readable checkpoint "
                               "(KeyError); delete it to train from the start")


@pytest.mark.parametrize("stats, advice", [
    ({"recon_loss": 0.5, "commit_loss": float("inf")}, "(non-finite: commit_loss); the last good checkpoint is kept at "
     "(none yet); lower that term's weight or train.lr"),
    ({"recon_loss": float("nan"), "commit_loss": float("nan")}, "(non-finite: recon_loss, commit_loss); the last good "
     "checkpoint is kept at (none yet); lower that term's weight or train.lr"),
    ({"recon_loss": 0.5, "commit_loss": 0.1}, "; the last good checkpoint is kept at (none yet); lower train.lr or "
     "train.grad_clip"),  # every term finite, their weighted sum not: nothing to single out
])
def test_non_finite_loss_names_the_term_that_went_non_finite(tmp_path, stats, advice):
    model, _, evaluate = make_problem()

    def step(idx):
        return model(torch.zeros(len(idx), 4)).sum() * float("inf"), stats

    with pytest.raises(TrainingDiverged) as info:
        fit(model, 64, step, evaluate, P, CPU, seed=1, checkpoint=tmp_path / "c.pt", monitor="loss", desc="train_x")
    assert re.fullmatch(r"train_x: loss is (nan|inf|-inf) at epoch 1, step 0 ?" + re.escape(advice), str(info.value))


def test_lr_schedule_warms_up_then_decays():
    values = [lr_factor(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1, abs=0.01)


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path):
    model, step, _ = make_problem()
    val_losses = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.3])  # best at epoch 2, then two worse epochs

    def evaluate():
        return {"loss": next(val_losses)}

    p = P.model_copy(update={"epochs": 6, "patience": 2})
    weights = {}
    result = fit(model, 64, step, evaluate, p, CPU, seed=1, checkpoint=tmp_path / "c.pt", monitor="loss",
                 on_epoch=lambda epoch, metrics: weights.update({epoch: {k: v.clone() for k, v in model.state_dict().items()}}))
    assert result.stopped_early and result.epochs == 4
    assert result.best["epoch"] == 2 and result.best["val_loss"] == 0.5
    final = model.state_dict()  # the best epoch's weights are restored, not the last epoch's
    assert all(torch.equal(final[k], weights[2][k]) for k in final)
    assert not all(torch.equal(final[k], weights[4][k]) for k in final)
