# mmdet's runtime with mmsparse registered; every mmsparse config inherits this.
_base_ = 'mmdet::_base_/default_runtime.py'

custom_imports = dict(imports=['mmsparse'], allow_failed_imports=False)
