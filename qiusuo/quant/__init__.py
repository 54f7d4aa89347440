"""Weight formats that stay quantised at run time: formats, kernels, modules."""
