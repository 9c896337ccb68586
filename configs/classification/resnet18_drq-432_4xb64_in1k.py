# Reproduces the paper's Table 3 ({4,3,2} multi-precision), ResNet18 row:
# 69.73 / 69.20 / 66.30 top-1 at w4/w3/w2 (FP32 69.76).
# Same recipe as resnet18_drq-8642_4xb64_in1k.py; INT4 is stored.
_base_ = './resnet18_drq-8642_4xb64_in1k.py'

model = dict(quantizer=dict(bits=[4, 3, 2]))
