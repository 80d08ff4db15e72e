"""vk-schedule: when each session starts (arrival processes, trace replay, closed-loop concurrency).

    from vk.schedule import schedule, schedule_stats
    recs = list(schedule(sessions, poisson=10, duration=60, seed=1))   # header first, then scheduled_session
    print(schedule_stats(recs))
"""

from vk.schedule.core import make_config, schedule
from vk.schedule.stats import schedule_stats

__all__ = ["schedule", "schedule_stats", "make_config"]
