"""A job's driver never builds a model, so it does not pay for importing CompressAI (seconds: its
point-cloud registry imports torch_geometric); the actors import it when they build their model."""

import subprocess
import sys

PROBE = (
    "import sys\n"
    "import ncpipe.pipeline.jobs, ncpipe.pipeline.distributor, ncpipe.pipeline.actors\n"
    "from ncpipe.models.registry import resolve_model\n"
    "print('imported:', ','.join(m for m in ('compressai', 'torch_geometric') if m in sys.modules))\n"
)


def test_the_job_driver_modules_do_not_import_compressai():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "imported:"


def test_building_a_model_still_imports_it():
    probe = ("import sys\nfrom ncpipe.models.architectures import build_adapter\nbuild_adapter('mbt2018-mean', "
             "{'N': 8, 'M': 8})\nprint('compressai' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "True"
