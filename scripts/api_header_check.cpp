// Compiled by CMakeLists.txt with the host compiler only: csrc/attention_api.h must not need nvcc.
#include "attention_api.h"

const char* mmict_api_header_check() { return mmict::attention_args_error(mmict::AttentionArgs{}); }
