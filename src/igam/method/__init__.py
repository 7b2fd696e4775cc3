"""The IGAM method (Chan, Tay & Ong, CVPR 2020), one file per part of the paper:

    adapters.py           input adapters x' = A x + b, target input -> teacher input (4.3, eq. 15)
    adapted.py            the fine-tuned teacher f_t(A x + b) (eqs. 6, 15-16)
    gradients.py          input gradients J = d L / d x (eqs. 8, 9, 17)
    discriminator.py      the gradient discriminator f_disc and its training (eqs. 10-12)
    matching.py           the IGAM loss, eq. 14, in exact mode (Algorithm 1)
    finite_difference.py  its parameter gradient from first-order passes (grad_matching=finite-difference)
    double_backward.py    a lean double backward through convolutions and BatchNorm for exact mode
    teacher_cache.py      the teacher's input gradients, computed once per training image

Only tensors and modules live here: no files, no configuration, no training loop. The loop is
igam.train, the objective that plugs this into it igam.objectives.igam.
"""
