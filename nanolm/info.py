"""`python -m nanolm.info`: how nanolm._C was built, library versions, devices, and which kernel
backend can run each op on each device (with the reason when one cannot)."""
import torch

from nanolm import backends


def build_info():
    try:
        from nanolm import _C
    except ImportError as e:
        return f"not built ({e})"
    return ", ".join(f"{k}={v}" for k, v in _C.build_info().items())


def library_versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"torch {torch.__version__}, triton {triton_version}"


def devices():
    found = [torch.device("cpu")]
    found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main():
    print(f"nanolm._C: {build_info()}")
    print(f"libraries: {library_versions()}")
    for device in devices():
        print(f"\n{device} ({device_name(device)}):")
        for op in backends.OPS:
            cells = []
            for name in backends.BACKENDS:
                reason = backends.unavailable_reason(name, op, device)
                cells.append(f"{name}: yes" if reason is None else f"{name}: no ({reason})")
            print(f"  {op:<14} " + "; ".join(cells))


if __name__ == "__main__":
    main()
