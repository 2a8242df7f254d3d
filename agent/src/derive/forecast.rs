//! placeholder
pub struct Forecast;
pub struct ForecastInterval;
pub struct ForecastParams;
pub fn forecast() {}
