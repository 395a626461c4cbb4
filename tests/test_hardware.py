"""What benchmarks print about the CPU: enough to tell two machines with the same name apart."""

from llamakin import hardware

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx2 fma avx512f avx512_bf16 avx512_vnni

processor\t: 1
cpu family\t: 99
model name\t: another name
"""


class FakePath:
    def __init__(self, text: str | None):
        self.text = text

    def __call__(self, *_):
        return self

    def read_text(self):
        if self.text is None:
            raise OSError("no /proc/cpuinfo")
        return self.text


def test_cpu_model_names_family_and_model_of_the_first_processor(monkeypatch):
    monkeypatch.setattr(hardware, "Path", FakePath(ZEN5))
    hardware._cpu_model.cache_clear()
    try:
        assert hardware._cpu_model() == "AMD EPYC (family 26, model 2)"
    finally:
        hardware._cpu_model.cache_clear()


def test_cpu_model_without_family_is_the_name_and_without_cpuinfo_the_platform(monkeypatch):
    monkeypatch.setattr(hardware, "Path", FakePath("model name\t: Some CPU\n"))
    hardware._cpu_model.cache_clear()
    try:
        assert hardware._cpu_model() == "Some CPU"
        monkeypatch.setattr(hardware, "Path", FakePath(None))
        hardware._cpu_model.cache_clear()
        assert hardware._cpu_model()  # platform.processor() or the machine type
    finally:
        hardware._cpu_model.cache_clear()


def test_describe_cpu_lists_the_flags_that_choose_speed_paths(monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"avx2", "avx512_vnni", "sse"}))
    text = hardware.describe_cpu()
    assert "flags: avx2 avx512_vnni;" in text and "torch threads" in text
