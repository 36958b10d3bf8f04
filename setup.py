"""memsieve: curate text-to-image training sets against memorization."""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "memsieve", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


class BuildWithJobs(build_py):
    """The wheel ships the job files of jobs/ as memsieve/jobs/*.yaml (one source of truth)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "memsieve", "jobs")
        os.makedirs(target, exist_ok=True)
        for path in sorted(glob.glob(os.path.join(HERE, "jobs", "*.yaml"))):
            shutil.copy(path, target)


CORE = [
    "apache-beam==2.77.0",
    "pyarrow>=17,<26",
    "protobuf<7",
    "numpy>=1.26,<2.6",
    "pillow>=10.3",
    "pyyaml>=6.0",
    "webdataset==1.0.2",
    "faiss-cpu==1.15.1",
    "opencv-python-headless==5.0.0.93",
    "rich>=13",
    "jinja2>=3.1",
    "matplotlib>=3.8",
    "scipy>=1.11",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch==3.3.0",
    "diffusers==0.42.1",
    "transformers==5.23.0",
    "safetensors>=0.4",
    "spacy==3.8.18",
    "spacy-lookups-data==1.0.5",
    "datasketch==2.0.0",
    "psutil>=5.9",
    "fsspec>=2024.2",
]

EXTRAS = {
    "dev": [
        "pytest==9.2.0",
        "pytest-timeout==2.4.0",
        "ruff==0.17.5",
        "pandas>=2.2",
        "duckdb>=1.1",
        "imagehash==4.3.2",
        "pdqhash==0.2.8",
        "dask==2026.8.0",
        "distributed==2026.8.0",
        "playwright==1.65.2",
        "moto[server]==5.2.5",  # a local S3 API for tests/test_s3.py
        "s3fs==2026.9.0",
    ],
    "demo": ["scikit-image>=0.24", "scikit-learn>=1.5"],
    "gcp": ["apache-beam[gcp]==2.77.0", "gcsfs>=2026.8"],  # gs:// through transforms/fsio.py
    "aws": ["apache-beam[aws]==2.77.0", "s3fs==2026.9.0"],  # s3:// through transforms/fsio.py
}

setup(
    name="memsieve",
    version=_version(),
    description="Batch pipeline that curates text-to-image training sets against memorization",
    python_requires=">=3.11",
    packages=find_packages(include=["pipeline*", "transforms*", "schemas*", "memsieve*"]),
    include_package_data=True,
    package_data={"pipeline": ["templates/*.html"], "memsieve": ["templates/*.yaml", "jobs/*.yaml"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["memsieve=memsieve.cli:main"]},
    cmdclass={"build_py": BuildWithJobs},
)
