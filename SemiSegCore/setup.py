"""Wheels carry the repository's Resources/configs and Resources/knowledge as package data (semiseg/resources/...),
copied at build time so that the files themselves stay where scripts and tests use them."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHARED = {"configs": "*.yaml", "knowledge": "*.txt"}
RESOURCES = Path(__file__).resolve().parent.parent / "Resources"


class BuildPyWithResources(build_py):
    def run(self):
        super().run()
        if not RESOURCES.is_dir():
            self.warn(f"{RESOURCES} not found: the wheel will not carry the example configs and knowledge texts")
            return
        for kind, pattern in SHARED.items():
            target = Path(self.build_lib) / "semiseg" / "resources" / kind
            self.mkpath(str(target))
            for path in sorted((RESOURCES / kind).glob(pattern)):
                self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildPyWithResources})
