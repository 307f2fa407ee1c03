"""The workspace artifacts: one module per store, each with a validated opener and a writer.

=====================  ==========================  ==========================================
module                 artifact                    opener / writer
=====================  ==========================  ==========================================
:mod:`.ae`             ``ae.zarr``                 :func:`~.ae.open_ae`, :func:`~.ae.template`
:mod:`.pois`           ``pois.parquet``            :class:`~.pois.PoiTable`
:mod:`.text`           ``text.zarr``               :class:`~.text.TextStore`
:mod:`.triplets`       ``triplets.zarr``           :class:`~.triplets.TripletStore`
:mod:`.field`          ``field*.zarr``             :func:`~.field.open_field`
:mod:`.models`         ``model*/``                 :func:`~.models.model_variant`
:mod:`.regions`        ``regions/<task>.parquet``  :class:`~.regions.RegionTable`
=====================  ==========================  ==========================================

:mod:`.chunks` (checksummed, resumable Zarr chunks and the chunk index), :mod:`.reads`
(verified chunk reads: a whole array, one window, or a selection),
:mod:`.chunk_cache` (decoded chunks shared by the threads of one pass) and
:mod:`.raster` (the (y, x, C) raster contract shared by ``ae.zarr`` and ``field*.zarr``)
are what the Zarr stores are built from. Stages never open another stage's output with
zarr, pyarrow or xarray directly: they go through these modules.
"""
