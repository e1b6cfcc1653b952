"""DICOMweb: QIDO-RS, WADO-RS, STOW-RS under /dicom-web and WADO-URI at /wado."""
