"""The provider: SMSBAT's statuses as types, and the sync and async clients that fetch them."""
