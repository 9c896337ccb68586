# The paper has no ResNet50 {4,3,2} row; this applies the ResNet18 {4,3,2}
# setting (69.73 / 69.20 / 66.30 for ResNet18) to ResNet-50.
_base_ = './resnet50_drq-8642_4xb64_in1k.py'

model = dict(quantizer=dict(bits=[4, 3, 2]))
