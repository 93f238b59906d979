// Python module of the extension: importing mmsparse._ext loads this library, whose files register
// their kernels as torch.ops.mmsparse.* (TORCH_LIBRARY_FRAGMENT).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmsparse CPU kernels, registered as torch.ops.mmsparse";
}
