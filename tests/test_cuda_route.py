"""The CUDA route, checked without a GPU: the vLLM 0.32 hooks the CUDA worker relies
on still exist, and the device helpers keep CPU results unchanged.
(The CUDA run itself: scripts/gpu_check.sh.)"""

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch


def test_vllm_builds_the_gpu_runner_through_make_model_runner():
    from vllm.v1.worker.gpu_worker import Worker

    from dspark_vllm.vllm_integration import DSparkGPUWorker

    assert list(inspect.signature(Worker._make_model_runner).parameters) == ["self"]
    assert "_make_model_runner()" in inspect.getsource(Worker._init_workspace_and_model_runner)
    assert DSparkGPUWorker._make_model_runner is not Worker._make_model_runner


def test_custom_class_sends_cuda_to_the_v1_runner():
    from vllm.config import VllmConfig

    config = SimpleNamespace(
        parallel_config=SimpleNamespace(distributed_executor_backend="mp", pipeline_parallel_size=1,
                                        use_ubatching=False),
        speculative_config=SimpleNamespace(method="custom_class", parallel_drafting=False,
                                           use_heterogeneous_vocab=False))
    assert "speculative method 'custom_class'" in VllmConfig._get_v2_model_runner_unsupported_features(config)


def _config(async_scheduling=None, use_ubatching=False):
    return SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
                           parallel_config=SimpleNamespace(use_ubatching=use_ubatching))


def test_cuda_worker_refuses_what_it_cannot_serve():
    from dspark_vllm.vllm_integration import _check_cuda_config

    _check_cuda_config(_config(), use_v2_model_runner=False)  # the supported route
    for config, v2, words in [(_config(), True, "V2 model runner"),
                              (_config(async_scheduling=True), False, "--no-async-scheduling"),
                              (_config(use_ubatching=True), False, "--enable-dbo")]:
        with pytest.raises(ValueError, match=words):
            _check_cuda_config(config, use_v2_model_runner=v2)


def test_host_to_device_on_the_cpu_is_a_plain_tensor():
    from dspark_vllm.vllm_integration import _host_to_device

    t = _host_to_device(np.array([3, 1, 2], dtype=np.int32), torch.device("cpu"), torch.long)
    assert t.dtype == torch.long and t.tolist() == [3, 1, 2]
    assert _host_to_device([0.5, 1.0], torch.device("cpu")).tolist() == [0.5, 1.0]


def test_sampling_rows_stay_where_vllm_keeps_them():
    from dspark_vllm.vllm_integration import sampling_rows

    temp = torch.tensor([0.0, 0.7, 1.0])
    meta = SimpleNamespace(all_greedy=False, temperature=temp, top_k=torch.tensor([0, 5, 0]), top_p=None,
                           frequency_penalties=torch.zeros(3), logitsprocs=SimpleNamespace(all=[]))
    rows = sampling_rows(meta, 2, vocab_size=10)
    assert rows.temperature.data_ptr() == temp.data_ptr()  # a view, no copy
    assert rows.is_greedy.tolist() == [True, False] and rows.top_k.tolist() == [0, 5]
    greedy = sampling_rows(SimpleNamespace(all_greedy=True, temperature=None, top_k=None, top_p=None,
                                           frequency_penalties=torch.zeros(3), logitsprocs=SimpleNamespace(all=[])),
                           3, vocab_size=10)
    assert greedy.temperature.device.type == "cpu" and greedy.is_greedy.all()
