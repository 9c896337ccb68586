# llama_char_drq-8642.py with every quantized Linear's input at 8 bits
# whatever bit its weights run at (weights {8,6,4,2}, activations 8): the
# weights + 8-bit activations mode. The input scale is one per layer and
# takes the scheduled lr (ALRS's per-bit rates are for per-bit scales).
#
#     python tools/train.py configs/language/llama_char_drq-8642_a8.py \
#         --cfg-options load_from=work_dirs/llama_char_fp32/iter_2000.pth
#     python tools/test.py configs/language/llama_char_drq-8642_a8.py \
#         work_dirs/llama_char_drq-8642_a8/iter_500.pth
_base_ = ['./llama_char_drq-8642.py']

model = dict(
    quantizer=dict(act_quantizer=dict(
        _delete_=True, type='ActQuantizer', fixed_bit=8)))
