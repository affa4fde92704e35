"""Driver-side job recipes: prepare once -> launch -> summarize, and the registry of job kinds."""

from bigray.recipes.gpt import FINETUNE, PRETRAIN
from bigray.recipes.launch import JobKind
from bigray.recipes.resnet import RESNET

JOBS: dict[str, JobKind] = {kind.name: kind for kind in (PRETRAIN, FINETUNE, RESNET)}
"""Every job kind by name ("gpt", "gpt-finetune", "resnet"); Tune's ``tune.trainer`` picks "gpt" or "resnet"."""
