"""Drop-in twins of other libraries' losses on the fused kernels, one module per library.

=========================  ==========================================================================
module                     twins of
=========================  ==========================================================================
``sentence_transformers``  sentence-transformers' ``MultipleNegativesRankingLoss`` family and
                           ``GISTEmbedLoss`` (extra ``contrastive-kernels[sentence-transformers]``)
=========================  ==========================================================================

Each module imports its library when it is itself imported (never ``import contrastive_kernels``),
and names the extra to install when the library is missing. (open_clip's ``ClipLoss`` and
``SigLipLoss`` twins predate this package and live in ``contrastive_kernels.modules``.)
"""
