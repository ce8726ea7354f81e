"""The paper's FGVC-Aircraft transfer experiment (ImageNet base, one patch).

    python -m launch.train --workdir runs/aircraft \
        --config configs/paper_aircraft.py:patch=scale_bias+logits

FGVC-Aircraft is not in tensorflow-datasets: export it as an ImageFolder at
data/fgvc_aircraft/{train,test}/<variant>/*.jpg.

Needs the data prepared for tensorflow-datasets (or the folder) and an accelerator for the full
schedule. Arguments: patch, model, weights, num_steps, batch_size, resolution.
"""

from kfor1.trainer.config import paper_transfer


def get_config(arg=None):
    return paper_transfer("folder:data/fgvc_aircraft", "aircraft", 20000, arg)
