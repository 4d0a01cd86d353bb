"""The build step that puts the DeepSpeed templates into the package.

`ds_configs/` stays at the top of the repository (where users look for and copy templates), but an installed
package has only what lies inside it, so `build_py` copies the templates to `hyperofa_dist/ds_configs/` in the
build tree; `runtime/dsconfig.py` finds them there with `importlib.resources`, and in a source checkout or an
editable install at the top of the repository. Everything else about the build is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TEMPLATES = Path(__file__).resolve().parent / "ds_configs"
PACKAGED = ("hyperofa_dist", "ds_configs")  # where the installed package holds them (runtime/dsconfig.py)


class BuildWithTemplates(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the source tree's ds_configs/ in place
            return
        templates = sorted(TEMPLATES.glob("*.json"))
        if not templates:  # a wheel without templates cannot run hypernet or pretrain: refuse to build it
            raise SystemExit(f"{TEMPLATES}: no DeepSpeed templates (*.json) to package")
        target = Path(self.build_lib, *PACKAGED)
        self.mkpath(str(target))
        for path in templates:
            self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildWithTemplates})
