"""The driver's progress line from what rank 0 posts: updates merged, one line per evaluated epoch
when the output is not a terminal."""

import io

from distnet.progress import Progress, ProgressPrinter, render


def test_updates_merge_and_render():
    state = Progress().merged(Progress(step=10, total_steps=40, loss=0.5))
    state = state.merged(Progress(epoch=1, acc=0.91)).merged(Progress(step=20, total_steps=40, loss=0.25))
    assert state == Progress(step=20, total_steps=40, loss=0.25, epoch=1, acc=0.91)
    assert render(state, 2, "test") == "epoch 1/2  [############............]  step 20/40  loss 0.2500  test acc 91.00%"
    assert render(Progress(), 3, "val") == "epoch 0/3  [........................]  step 0/?"


def test_a_log_gets_a_line_per_evaluated_epoch():
    posted = iter([Progress(), Progress(step=5, total_steps=10, loss=1.0),
                   Progress(step=5, total_steps=10, loss=1.0, epoch=1, acc=0.5)])
    out = io.StringIO()
    printer = ProgressPrinter(lambda: next(posted), 2, "test", stream=out)
    for _ in range(3):
        printer._show(printer.get_state())
    assert out.getvalue() == "epoch 1/2  [############............]  step 5/10  loss 1.0000  test acc 50.00%\n"
