from agent.providers import CPU, CUDA, TENSORRT, PrecisionTrial, choose_cpu_precision, plan_execution

ALL = {"fp32", "int8", "fp16"}


def test_cuda_box_runs_fp16_on_cuda():
    plan = plan_execution([CUDA, CPU], "auto", "auto", ALL)
    assert plan.providers == [CUDA, CPU] and plan.precision == "fp16" and plan.device == "cuda"


def test_cpu_box_measures_precision():
    plan = plan_execution([CPU], "auto", "auto", ALL)
    assert plan.providers == [CPU] and plan.precision == "auto" and plan.note == ""


def test_requested_cuda_without_cuda_falls_back_with_a_note():
    plan = plan_execution([CPU], "cuda", "auto", ALL)
    assert plan.providers == [CPU] and "not available" in plan.note


def test_tensorrt_when_present_else_cuda():
    assert plan_execution([TENSORRT, CUDA, CPU], "tensorrt", "auto", ALL).providers[0] == TENSORRT
    plan = plan_execution([CUDA, CPU], "tensorrt", "auto", ALL)
    assert plan.providers[0] == CUDA and "TensorRT" in plan.note


def test_bundle_without_fp16_stays_on_cpu_even_with_cuda():
    assert plan_execution([CUDA, CPU], "auto", "auto", {"fp32", "int8"}).device == "cpu"


def test_fp16_request_on_cpu_uses_fp32():
    plan = plan_execution([CPU], "cpu", "fp16", ALL)
    assert plan.precision == "fp32" and "not usable" in plan.note


def test_explicit_precision_is_kept():
    assert plan_execution([CPU], "cpu", "int8", ALL).precision == "int8"


def test_choose_int8_only_if_faster_and_agreeing():
    fast_ok = {"fp32": PrecisionTrial(10.0, 1.0), "int8": PrecisionTrial(5.0, 0.995)}
    fast_bad = {"fp32": PrecisionTrial(10.0, 1.0), "int8": PrecisionTrial(5.0, 0.9)}
    barely = {"fp32": PrecisionTrial(10.0, 1.0), "int8": PrecisionTrial(9.8, 1.0)}
    assert choose_cpu_precision(fast_ok) == "int8"
    assert choose_cpu_precision(fast_bad) == "fp32"
    assert choose_cpu_precision(barely) == "fp32"


def test_chunks_respect_text_and_token_budgets():
    from agent.engine import _chunks

    lengths = [5] * 10 + [50] * 4 + [120] * 3
    chunks = _chunks(list(range(len(lengths))), lengths, max_texts=8, max_tokens=256)
    assert [i for c in chunks for i in c] == list(range(len(lengths)))
    for c in chunks:
        assert len(c) <= 8 and len(c) * max(lengths[i] for i in c) <= max(256, max(lengths[i] for i in c))
    # A text longer than the budget still runs, alone.
    assert _chunks([0], [5000], 8, 256) == [[0]]
