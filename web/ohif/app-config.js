/*
 * OHIF 3.13 configuration of the DICOM router, served at /ohif/app-config.js instead of the
 * dist's own. One data source: the router's DICOMweb on the same origin (the session cookie
 * goes with every request), WADO-RS rendering, nothing loaded from anywhere else.
 */
(function () {
  'use strict';
  var dicomweb = window.location.origin + '/dicom-web';

  window.config = {
    name: 'dicom-router',
    routerBasename: '/ohif',
    extensions: [],
    modes: [],
    customizationService: {},
    showStudyList: true,
    maxNumberOfWebWorkers: 3,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    groupEnabledModesFirst: true,
    // No "investigational use only" dialog on every visit; the router is not a diagnostic device
    // either, which the deployment documents.
    investigationalUseDialog: { option: 'never' },
    maxNumRequests: { interaction: 100, thumbnail: 75, prefetch: 25 },
    showErrorDetails: 'never',
    defaultDataSourceName: 'router',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'router',
        configuration: {
          friendlyName: 'DICOM Router',
          name: 'router',
          qidoRoot: dicomweb,
          wadoRoot: dicomweb,
          wadoUriRoot: window.location.origin + '/wado',
          qidoSupportsIncludeField: true,
          supportsReject: false,
          dicomUploadEnabled: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video,pdf',
          bulkDataURI: { enabled: true, relativeResolution: 'studies' },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
    httpErrorHandler: function (error) {
      // A 401 means the router session ended: log in again and come back here.
      if (error && error.status === 401) {
        window.location.assign('/login?next=' + encodeURIComponent(
          window.location.pathname + window.location.search));
      }
    },
  };
})();
