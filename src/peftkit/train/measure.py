"""Memory measurements reported by the trainer and co-training."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """Resident set size high-water mark of this process, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peak_cuda_memory_mb(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated on ``device`` in MiB; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# Said with every energy figure: this machine's CPU exposes no power counters (no RAPL), so codecarbon
# estimates the power from the CPU's thermal design power (TDP) and its load, not from a meter.
ENERGY_NOTE = "estimate: codecarbon, from CPU TDP x load and RAM size (no power counters read)"


class ResourceMeter:
    """CPU-seconds of this process (all its threads) over a span and, where codecarbon is installed
    (`pip install "peftkit[energy]"`), its energy estimate for the same span.

    codecarbon runs offline (no network): `country_iso_code` only picks the carbon intensity for the
    emissions figure, not the energy. Where codecarbon reads power counters (Intel RAPL, NVIDIA NVML) its
    figure is measured; where it cannot (this project's CPU machine), it falls back to TDP x load, which
    `energy_note` says.
    """

    def __init__(self, measure_energy: bool = True, country_iso_code: str = "USA"):
        self.measure_energy, self.country_iso_code = measure_energy, country_iso_code
        self.tracker = None

    def start(self) -> None:
        import importlib.util
        import time

        self.cpu_started = time.process_time()
        if self.measure_energy and importlib.util.find_spec("codecarbon") is not None:
            import inspect
            import logging

            from peftkit.extras import require

            emissions = require("codecarbon", "measuring energy")
            # No file output: codecarbon 3 says so with output_methods=[] (save_to_file is deprecated there), 2.x with save_to_file.
            accepted = inspect.signature(emissions.emissions_tracker.BaseEmissionsTracker.__init__).parameters
            quiet = {"output_methods": []} if "output_methods" in accepted else {"save_to_file": False}
            self.tracker = emissions.OfflineEmissionsTracker(
                country_iso_code=self.country_iso_code, log_level="error", measure_power_secs=5, tracking_mode="process", **quiet)
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            self.tracker.start()

    def stop(self) -> dict:
        """{"cpu_seconds", "energy_kwh" (None without codecarbon), "energy_note"} for the span since start()."""
        import time

        result = {"cpu_seconds": time.process_time() - self.cpu_started, "energy_kwh": None, "energy_note": None}
        if self.tracker is not None:
            self.tracker.stop()
            data = self.tracker.final_emissions_data
            result["energy_kwh"] = float(data.energy_consumed)
            result["energy_note"] = "codecarbon, from RAPL power counters" if rapl_readable() else ENERGY_NOTE
            self.tracker = None
        return result


def rapl_readable() -> bool:
    """Whether this machine lets the process read Intel RAPL energy counters (what codecarbon measures with)."""
    import glob

    for path in glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj"):
        try:
            with open(path) as counter:
                counter.read()
            return True
        except OSError:
            continue
    return False
