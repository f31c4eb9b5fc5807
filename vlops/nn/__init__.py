"""Drop-in nn.Modules, state_dict- and signature-compatible with the modules they replace."""
from .contrastive import ClipLoss, SigLipLoss, UniClLoss

__all__ = ["ClipLoss", "SigLipLoss", "UniClLoss"]
