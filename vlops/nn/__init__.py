"""Drop-in nn.Modules, state_dict- and signature-compatible with the modules they replace."""
from .coattention import CoAttention, CoAttentionBlock
from .contrastive import ClipLoss, SigLipLoss, UniClLoss
from .patch_embed import PatchEmbed

__all__ = ["ClipLoss", "SigLipLoss", "UniClLoss", "PatchEmbed", "CoAttention", "CoAttentionBlock"]
