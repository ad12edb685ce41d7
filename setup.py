from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="whisper_scratch",
    version="0.1.0",
    description="Whisper speech recognition trained from scratch (Common Voice, one small GPU or a CPU)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["whisper_scratch", "whisper_scratch.*"]),
    # Ranges here, exact pins in requirements.txt. torch has an upper bound on purpose: an open
    # range pulls the newest multi-GB CUDA build even where a compatible torch is installed.
    install_requires=[
        "torch>=2.4,<2.14",
        "numpy>=1.24",
        "soundfile>=0.12.1",
        "soxr>=0.3.7",
        "jiwer>=3.0",
        "sentencepiece>=0.2.0",
        "tqdm>=4.60",
        "silero-vad>=5.1",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "python-multipart>=0.0.9",
    ],
    extras_require={"dev": ["pytest>=8", "openai>=1.30", "hypothesis>=6"]},
    entry_points={"console_scripts": ["whisper-scratch-server=whisper_scratch.server:main"]},
)
