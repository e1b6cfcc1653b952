"""How the router names itself to DICOM peers and in the files it writes.

PS3.7 D.3.3.2: every A-ASSOCIATE-RQ and -AC carries an Implementation Class UID and may carry
an Implementation Version Name; PS3.10 7.1 puts the same in the file meta of each file an
implementation writes. The router's own upper layer (router/dicom/push_scp.py,
router/dicom/store_scu.py) and the spool files it writes are ours, not pynetdicom's, so peers'
logs and conformance checks should credit them to us. Associations pynetdicom serves for us
(query/retrieve, C-GET) announce the same names (router/dicom/scp.py, qr_scu.py).

The UID is a UUID-derived UID (PS3.5 B.2, root 2.25), made once for this project; the version
name changes with a release whose DICOM behaviour changes.
"""

IMPLEMENTATION_UID = "2.25.170174630630639086475207203093044210265"
IMPLEMENTATION_VERSION = "DICOMROUTER_0.1"  # at most 16 characters (VR SH)
