"""speechkd data pipeline: samples -> speech -> features -> teacher logit cache."""
