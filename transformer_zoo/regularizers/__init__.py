"""Training regularizers and embedding post-processing: R-Drop, SimCSE, BERT-whitening."""

from transformer_zoo.regularizers.rdrop import RDropLoss
from transformer_zoo.regularizers.simcse import SimCSELoss
from transformer_zoo.regularizers.two_pass import two_pass_forward
from transformer_zoo.regularizers.whitening import Whitening

__all__ = ["RDropLoss", "SimCSELoss", "Whitening", "two_pass_forward"]
