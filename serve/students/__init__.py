"""Student lifecycle: teacher labels, evaluation, calibration, shadow traffic, promotion."""
