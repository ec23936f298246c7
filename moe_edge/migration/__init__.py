"""Runtime migration: slots, transfer schedules, trigger, incremental planner, failure, replay."""
